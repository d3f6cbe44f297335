//! A scripted hypervisor VNC server for exact tests: after ServerInit it echoes every
//! byte back (so a relay's byte path is checked end to end), or streams a pattern and
//! then resets, or just holds the connection.

use relay::rfb::vnc_auth;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub enum Security {
    None,
    Password(String),
    /// Refuses every connection before security, with this reason.
    Refuse(String),
    /// VeNCrypt X509None, as QEMU offers it without a password: TLS under this server
    /// configuration, and everything after it (SecurityResult on) inside TLS.
    Vencrypt(Arc<rustls::ServerConfig>),
}

#[derive(Debug, Clone, Copy)]
pub enum After {
    /// Echo everything back until the viewer's EOF, then close.
    Echo,
    /// Send this many pattern bytes (`i % 251`), then reset the connection.
    ResetAfter(usize),
    /// Read and discard forever; never close (a hypervisor ignoring the viewer's FIN).
    Hold,
    /// Send this many pattern bytes, then FIN; keep reading until the viewer's EOF.
    SendThenFin(usize),
    /// Send pattern bytes as fast as the connection takes them, `total` in all, then
    /// FIN; `FakeVnc::sent` counts what has been written so far.
    Flood(usize),
}

#[derive(Debug, Clone)]
pub struct Script {
    pub security: Security,
    pub after: After,
    /// Expect `CONNECT <path> HTTP/1.1` first and answer with this status; with 200 the
    /// RFB greeting goes out in the same write as the reply.
    pub connect_status: Option<u16>,
    /// Send ServerInit with SecurityResult, before the ClientInit arrives, so bytes are
    /// already in flight when relay hands the session to its relay.
    pub eager_init: bool,
}

impl Script {
    pub fn echo() -> Script {
        Script { security: Security::None, after: After::Echo, connect_status: None, eager_init: false }
    }
    pub fn after(after: After) -> Script {
        Script { after, ..Script::echo() }
    }
}

/// The ServerInit `FakeVnc` sends: 64x48, named "fake".
pub const SERVER_INIT_LEN: usize = 24 + 4;

pub struct FakeVnc {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// What the fake saw, across its connections.
#[derive(Default)]
pub struct Shared {
    /// Pattern bytes written so far (Flood, SendThenFin, ResetAfter).
    pub sent: AtomicUsize,
    /// Bytes received after ServerInit.
    pub received: AtomicUsize,
    /// How each connection's reading side ended: "eof", "reset" or "error: ...".
    pub ends: std::sync::Mutex<Vec<String>>,
}

impl FakeVnc {
    pub async fn start(script: Script) -> FakeVnc {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let seen = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (script, seen) = (script.clone(), seen.clone());
                tokio::spawn(async move {
                    let end = match serve(stream, script, &seen).await {
                        Ok(()) => "eof".to_string(),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".to_string(),
                        Err(e) => format!("error: {e}"),
                    };
                    seen.ends.lock().unwrap().push(end);
                });
            }
        });
        FakeVnc { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    pub fn sent(&self) -> usize {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Waits (up to 5 s) until a connection has ended; returns how each one ended.
    pub async fn ends(&self) -> Vec<String> {
        let started = std::time::Instant::now();
        while self.shared.ends.lock().unwrap().is_empty() && started.elapsed() < std::time::Duration::from_secs(5) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.shared.ends.lock().unwrap().clone()
    }

    /// Waits until the pattern this hypervisor writes stops advancing (its reader stalled
    /// and every buffer on the way is full); returns the bytes written by then.
    pub async fn sent_when_blocked(&self) -> usize {
        let mut last = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let sent = self.sent();
            if sent == last {
                return last;
            }
            last = sent;
        }
    }
}

/// Reads until EOF or `limit` bytes, checking every byte against [`pattern`]; returns how
/// many came.
pub async fn read_pattern(s: &mut (impl AsyncRead + Unpin), limit: usize) -> usize {
    let expected = pattern(0, 251 * 4096);
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0usize;
    while at < limit {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            let off = (at + done) % 251;
            let take = (n - done).min(expected.len() - off);
            assert!(buf[done..done + take] == expected[off..off + take], "byte {} out of order", at + done);
            done += take;
        }
        at += n;
    }
    at
}

impl Drop for FakeVnc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, script: Script, seen: &Shared) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut greeting = b"RFB 003.008\n".to_vec();
    if let Some(status) = script.connect_status {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
            head.push(s.read_u8().await?);
        }
        if !head.starts_with(b"CONNECT ") {
            return Ok(());
        }
        let mut reply = format!("HTTP/1.1 {status} Status\r\n\r\n").into_bytes();
        if status != 200 {
            return s.write_all(&reply).await;
        }
        reply.extend_from_slice(&greeting);
        greeting = reply;
    }
    s.write_all(&greeting).await?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    match &script.security {
        Security::Refuse(why) => {
            s.write_all(&[0]).await?;
            return write_reason(&mut s, why).await;
        }
        Security::None => {
            s.write_all(&[1, 1]).await?;
            s.read_u8().await?;
        }
        Security::Vencrypt(config) => {
            s.write_all(&[1, 19]).await?;
            s.read_u8().await?;
            s.write_all(&[0, 2]).await?; // VeNCrypt 0.2
            s.read_u16().await?;
            s.write_all(&[0, 1, 0, 0, 1, 4]).await?; // version accepted; one subtype: X509None
            s.read_u32().await?;
            s.write_all(&[1]).await?;
            let tls = tokio_rustls::TlsAcceptor::from(config.clone()).accept(s).await?;
            return after_security(tls, &script, seen).await;
        }
        Security::Password(password) => {
            s.write_all(&[1, 2]).await?;
            s.read_u8().await?;
            let challenge = [0x42u8; 16];
            s.write_all(&challenge).await?;
            let mut answer = [0u8; 16];
            s.read_exact(&mut answer).await?;
            if !vnc_auth::verify(password.as_bytes(), &challenge, &answer) {
                s.write_u32(1).await?;
                return write_reason(&mut s, "Authentication failed").await;
            }
        }
    }
    after_security(s, &script, seen).await
}

/// A connection the fake hypervisor can drop with a reset.
trait Resettable: AsyncRead + AsyncWrite + Unpin {
    fn reset(&self) -> std::io::Result<()>;
}

impl Resettable for TcpStream {
    fn reset(&self) -> std::io::Result<()> {
        self.set_zero_linger()
    }
}

impl Resettable for tokio_rustls::server::TlsStream<TcpStream> {
    fn reset(&self) -> std::io::Result<()> {
        self.get_ref().0.set_zero_linger()
    }
}

/// SecurityResult, the init messages, then the script.
async fn after_security(mut s: impl Resettable, script: &Script, seen: &Shared) -> std::io::Result<()> {
    let mut init = 0u32.to_be_bytes().to_vec(); // SecurityResult OK
    let mut server_init = vec![0, 64, 0, 48, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];
    server_init.extend_from_slice(&4u32.to_be_bytes());
    server_init.extend_from_slice(b"fake");
    if script.eager_init {
        init.extend_from_slice(&server_init);
        s.write_all(&init).await?;
        s.read_u8().await?; // ClientInit
    } else {
        s.write_all(&init).await?;
        s.read_u8().await?; // ClientInit
        s.write_all(&server_init).await?;
    }
    match script.after {
        After::Echo => {
            let (mut r, mut w) = tokio::io::split(&mut s);
            let n = tokio::io::copy(&mut r, &mut w).await?;
            seen.received.fetch_add(n as usize, Ordering::SeqCst);
            w.shutdown().await
        }
        After::SendThenFin(n) => {
            s.write_all(&pattern(0, n)).await?;
            seen.sent.fetch_add(n, Ordering::SeqCst);
            s.shutdown().await?;
            drain(&mut s, seen).await
        }
        After::Flood(total) => {
            let (mut r, mut w) = tokio::io::split(&mut s);
            let flood = async {
                let chunk = pattern(0, 1 << 16);
                let mut sent = 0;
                while sent < total {
                    // Chunks are whole multiples of 251 from the start, so the pattern
                    // continues across them: (i % 251) at every offset i.
                    let n = (total - sent).min(chunk.len() / 251 * 251);
                    w.write_all(&chunk[..n]).await?;
                    sent += n;
                    seen.sent.fetch_add(n, Ordering::SeqCst);
                }
                w.shutdown().await
            };
            let read = async {
                let mut sink = [0u8; 4096];
                loop {
                    match r.read(&mut sink).await {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            seen.received.fetch_add(n, Ordering::SeqCst);
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            let (a, b) = tokio::join!(flood, read);
            a.and(b)
        }
        After::Hold => {
            drain(&mut s, seen).await?;
            std::future::pending().await
        }
        After::ResetAfter(n) => {
            s.write_all(&pattern(0, n)).await?;
            seen.sent.fetch_add(n, Ordering::SeqCst);
            s.reset()
        }
    }
}

async fn write_reason<S: AsyncWrite + AsyncRead + Unpin>(s: &mut S, why: &str) -> std::io::Result<()> {
    s.write_u32(why.len() as u32).await?;
    s.write_all(why.as_bytes()).await
}

/// `n` bytes of the pattern `(i % 251)` starting at offset `from`.
pub fn pattern(from: usize, n: usize) -> Vec<u8> {
    (from..from + n).map(|i| (i % 251) as u8).collect()
}

/// Reads until EOF, counting; an error (a reset) is returned.
async fn drain(s: &mut (impl AsyncRead + Unpin), seen: &Shared) -> std::io::Result<()> {
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink).await? {
            0 => return Ok(()),
            n => {
                seen.received.fetch_add(n, Ordering::SeqCst);
            }
        }
    }
}
