//! The fake hypervisor: an RFB 3.8 server offering security type None, then a tiny
//! command protocol the bench client drives after ServerInit.
//!
//! After ServerInit the client sends one command of 9 bytes: a mode byte and a u64
//! (big-endian) byte count.
//! - `E`: echo everything back until end of stream (latency),
//! - `S`: send that many bytes (throughput down: hypervisor to viewer),
//! - `K`: read that many bytes, then send one byte as acknowledgement (throughput up),
//! - `U`: screen updates: read messages of that many bytes, and answer each with as many
//!   bytes as its first four say (big-endian), as a framebuffer update answers input.
//! - `C`: send the count of bytes received in `K` mode so far, over all connections, as a
//!   u64 (big-endian): a throughput run cut short by its time limit still knows how much
//!   arrived.
//!
//! A connection that ends before sending a command (handshake and idle-session runs)
//! just ends.
//!
//! It runs in a process of its own (`relay-bench --serve-hypervisor`), as a hypervisor is
//! never the viewer's: in one process, a direct round trip can run on one thread without
//! a single wake-up, a baseline no deployment has.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const VERSION: &[u8; 12] = b"RFB 003.008\n";

/// ServerInit: 64x48, 32 bpp true colour, name "fake".
pub const SERVER_INIT: [u8; 28] = [
    0, 64, 0, 48, // width, height
    32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0, // pixel format
    0, 0, 0, 4, b'f', b'a', b'k', b'e',
];

pub const MODE_ECHO: u8 = b'E';
pub const MODE_SOURCE: u8 = b'S';
pub const MODE_SINK: u8 = b'K';
pub const MODE_UPDATES: u8 = b'U';
pub const MODE_COUNT: u8 = b'C';
/// The largest update `U` sends.
pub const MAX_UPDATE: usize = 64 << 10;

/// Serves on `addr` until the runtime ends.
pub async fn serve_on(addr: SocketAddr, chunk: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    // Bytes received in sink mode, over all connections, ever.
    let sunk = Arc::new(AtomicU64::new(0));
    let payload: Arc<[u8]> = (0..chunk).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>().into();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let sunk = sunk.clone();
                    let payload = payload.clone();
                    tokio::spawn(async move {
                        let _ = serve(stream, &sunk, &payload).await;
                    });
                }
                // Out of descriptors or similar: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    Ok(())
}

async fn serve(mut s: TcpStream, sunk: &AtomicU64, payload: &[u8]) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.write_all(VERSION).await?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    s.write_all(&[1, 1]).await?; // one security type: None
    let mut choice = [0u8; 1];
    s.read_exact(&mut choice).await?;
    if choice[0] != 1 {
        return Ok(());
    }
    s.write_all(&[0, 0, 0, 0]).await?; // SecurityResult OK
    let mut client_init = [0u8; 1];
    s.read_exact(&mut client_init).await?;
    s.write_all(&SERVER_INIT).await?;

    let mut cmd = [0u8; 9];
    if s.read_exact(&mut cmd).await.is_err() {
        return Ok(()); // handshake-only or idle session, now closed
    }
    let count = u64::from_be_bytes(cmd[1..9].try_into().expect("8 bytes"));
    let mut buf = vec![0u8; payload.len().max(4096)];
    match cmd[0] {
        MODE_ECHO => loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n]).await?;
        },
        MODE_UPDATES => {
            let mut message = vec![0u8; (count as usize).clamp(4, 4096)];
            let update: Vec<u8> = (0..MAX_UPDATE).map(|i| (i * 7 + 3) as u8).collect();
            loop {
                if s.read_exact(&mut message).await.is_err() {
                    return Ok(());
                }
                let size = u32::from_be_bytes(message[..4].try_into().expect("4 bytes")) as usize;
                s.write_all(&update[..size.min(MAX_UPDATE)]).await?;
            }
        }
        MODE_SOURCE => {
            let mut left = count;
            while left > 0 {
                let n = (left as usize).min(payload.len());
                s.write_all(&payload[..n]).await?;
                left -= n as u64;
            }
        }
        MODE_COUNT => s.write_all(&sunk.load(Ordering::Relaxed).to_be_bytes()).await?,
        MODE_SINK => {
            let mut left = count;
            while left > 0 {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                sunk.fetch_add(n as u64, Ordering::Relaxed);
                left = left.saturating_sub(n as u64);
            }
            s.write_all(&[1]).await?;
        }
        _ => return Ok(()),
    }
    // Wait for the client to close.
    while s.read(&mut buf).await? > 0 {}
    Ok(())
}
