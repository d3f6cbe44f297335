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
}

#[derive(Debug, Clone, Copy)]
pub enum After {
    /// Echo everything back until the viewer's EOF, then close.
    Echo,
    /// Send this many pattern bytes (`i % 251`), then reset the connection.
    ResetAfter(usize),
    /// Read and discard forever; never close (a hypervisor ignoring the viewer's FIN).
    Hold,
}

#[derive(Debug, Clone)]
pub struct Script {
    pub security: Security,
    pub after: After,
    /// Expect `CONNECT <path> HTTP/1.1` first and answer with this status; with 200 the
    /// RFB greeting goes out in the same write as the reply.
    pub connect_status: Option<u16>,
}

impl Script {
    pub fn echo() -> Script {
        Script { security: Security::None, after: After::Echo, connect_status: None }
    }
    pub fn after(after: After) -> Script {
        Script { after, ..Script::echo() }
    }
}

/// The ServerInit `FakeVnc` sends: 64x48, named "fake".
pub const SERVER_INIT_LEN: usize = 24 + 4;

pub struct FakeVnc {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FakeVnc {
    pub async fn start(script: Script) -> FakeVnc {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, script).await;
                });
            }
        });
        FakeVnc { addr, accepted, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FakeVnc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, script: Script) -> std::io::Result<()> {
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
    s.write_u32(0).await?;
    s.read_u8().await?; // ClientInit
    let mut init = vec![0, 64, 0, 48, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];
    init.extend_from_slice(&4u32.to_be_bytes());
    init.extend_from_slice(b"fake");
    s.write_all(&init).await?;
    match script.after {
        After::Echo => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
        After::Hold => {
            let mut sink = [0u8; 4096];
            while s.read(&mut sink).await? > 0 {}
            std::future::pending().await
        }
        After::ResetAfter(n) => {
            let pattern: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            s.write_all(&pattern).await?;
            s.set_zero_linger()?;
            Ok(())
        }
    }
}

async fn write_reason<S: AsyncWrite + AsyncRead + Unpin>(s: &mut S, why: &str) -> std::io::Result<()> {
    s.write_u32(why.len() as u32).await?;
    s.write_all(why.as_bytes()).await
}
