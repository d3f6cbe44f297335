//! A relay running inside the test process on ephemeral ports, with helpers to reach
//! its doors and its control socket the way real clients do.

use crate::ws_viewer::WsByteStream;
use anyhow::{Context, bail};
use relay::auth::{NewToken, Secret, Target};
use relay::config::Config;
use relay::control::client::{call, request};
use relay::control::proto::{Envelope, Request};
use relay::control::replies::Stats;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type WsViewer = WsByteStream<MaybeTlsStream<TcpStream>>;
/// The WebSocket door at frame level.
pub type WsFrames = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct TestRelay {
    pub ws: SocketAddr,
    pub connect: SocketAddr,
    pub control: PathBuf,
    pub dir: PathBuf,
    /// Every listening address of every door.
    pub listening: Vec<(relay::conn::Listener, SocketAddr)>,
    /// The metrics listener, when configured.
    pub metrics: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
}

/// A private scratch directory per call, removed by its owner.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("relay-test-{}-{}-{tag}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

impl TestRelay {
    pub async fn start() -> TestRelay {
        Self::start_with(|_| {}).await
    }

    /// Starts relay on 127.0.0.1 ephemeral ports after `adjust` has had its say.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestRelay {
        // relay's log, captured per test and shown when one fails (RUST_LOG to change).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let dir = scratch_dir("relay");
        let mut config = Config::default();
        config.listen.websocket = "127.0.0.1:0".parse::<SocketAddr>().unwrap().into();
        config.listen.connect = "127.0.0.1:0".parse::<SocketAddr>().unwrap().into();
        config.listen.control = Some(dir.join("control.sock"));
        config.limits.handshake_timeout_secs = 5;
        config.limits.shutdown_grace_secs = 2;
        // Tests that need another store say so; a shared default file would couple them.
        config.store.backend = relay::config::StoreBackend::Memory;
        adjust(&mut config);
        let (bound_tx, bound_rx) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        // Stops when `stop` fires (on drop); the task ends with it.
        tokio::spawn(relay::server::run(
            config,
            Default::default(),
            move |b| {
                let _ = bound_tx.send(b.clone());
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let bound = bound_rx.await.expect("relay started");
        TestRelay {
            ws: bound.websocket.unwrap_or(([127, 0, 0, 1], 9).into()),
            connect: bound.connect.unwrap_or(([127, 0, 0, 1], 9).into()),
            control: bound.control,
            listening: bound.all,
            metrics: bound.metrics,
            dir,
            stop: Some(stop),
        }
    }

    /// Asks relay to shut down, as SIGTERM does (it drains first when `drain_secs` is set).
    pub fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn ctl(&self, req: Request) -> anyhow::Result<Value> {
        Ok(request(&self.control, &Envelope::new(req)).await?)
    }

    /// `stats`, typed.
    pub async fn stats(&self) -> Stats {
        call(&self.control, Request::Stats).await.expect("stats")
    }

    /// Waits (up to 2 s) until no console is live: a viewer sees its console's end a
    /// moment before relay's bookkeeping of it is done (on uring, the ring reports the end
    /// after it has shut the sockets down).
    pub async fn no_live_consoles(&self) {
        let started = std::time::Instant::now();
        loop {
            let live = self.stats().await.sessions_active;
            if live == 0 {
                return;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(2), "{live} consoles still live 2 s after their end");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// `stats` once `n` consoles have ended (waiting up to 5 s for them).
    pub async fn ended(&self, n: u64) -> Stats {
        let started = std::time::Instant::now();
        loop {
            let stats = self.stats().await;
            if stats.counters.sessions_ended >= n {
                return stats;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{} of {n} consoles ended: {stats:?}",
                stats.counters.sessions_ended
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A token for `instance` whose console is the VNC server at `hypervisor`.
    pub async fn token(&self, instance: &str, hypervisor: SocketAddr) -> String {
        self.token_with(new_token(instance, hypervisor)).await
    }

    pub async fn token_with(&self, req: NewToken) -> String {
        let reply = self.ctl(Request::TokenCreate(req)).await.expect("token create");
        reply["token"].as_str().expect("token in reply").to_string()
    }

    /// Opens the CONNECT door. Returns the stream after a 200, or the status line.
    pub async fn connect_door(&self, token: &str) -> Result<TcpStream, String> {
        connect_door_at(self.connect, token).await
    }

    /// Opens the WebSocket door at `path_and_query` (e.g. `/?token=T`) with extra headers.
    pub async fn websocket(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsViewer, tokio_tungstenite::tungstenite::Error> {
        websocket_at(self.ws, path_and_query, headers).await
    }

    /// The WebSocket door at frame level, for tests of the framing itself.
    pub async fn websocket_frames(&self, path_and_query: &str) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        let mut req = format!("ws://{}{path_and_query}", self.ws).into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
        tokio_tungstenite::connect_async(req).await.expect("upgrade").0
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens a CONNECT door at `addr` (a relay process's, or a proxy's in front of one).
/// Returns the stream after a 200, or the response head.
pub async fn connect_door_at(addr: SocketAddr, token: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT /console?token={token} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let head = read_head(&mut s).await.map_err(|e| e.to_string())?;
    if head == "HTTP/1.1 200 OK\r\n\r\n" { Ok(s) } else { Err(head) }
}

/// Opens a WebSocket door at `addr` (relay's, or a proxy's in front of it).
pub async fn websocket_at(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<WsViewer, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}{path_and_query}").into_client_request()?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
    for (name, value) in headers {
        req.headers_mut().insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    let (ws, _resp): (WebSocketStream<_>, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(WsByteStream::new(ws))
}

pub fn new_token(instance: &str, hypervisor: SocketAddr) -> NewToken {
    NewToken {
        instance: instance.into(),
        console: "vnc".into(),
        target: Target { host: hypervisor.ip().to_string(), port: hypervisor.port(), internal_access_path: None },
        ttl: None,
        idle_timeout: None,
        single_use: false,
        hypervisor_schemes: None,
        hypervisor_password: None,
        password: None,
    }
}

pub fn with_hypervisor_password(mut t: NewToken, password: &str) -> NewToken {
    t.hypervisor_password = Some(Secret(password.into()));
    t
}

/// Reads an HTTP head (through the blank line) byte by byte, so nothing after it is
/// consumed; then, for an error status, the rest of the response too.
pub async fn read_head(s: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!("closed after {:?}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
        if head.len() > 16 << 10 {
            bail!("head too long");
        }
    }
    let mut text = String::from_utf8(head).context("head is UTF-8")?;
    if !text.starts_with("HTTP/1.1 200") {
        let mut body = String::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read_to_string(&mut body)).await;
        text.push_str(&body);
    }
    Ok(text)
}
