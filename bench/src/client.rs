//! The bench's viewer: reaches the fake hypervisor through one path (straight, a
//! CONNECT door, or a WebSocket), does the viewer's side of the RFB 3.8 handshake with
//! security None, and reads ServerInit.

use crate::hv;
use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// How a client opens a console.
#[derive(Clone, Debug)]
pub enum Door {
    /// Plain TCP: the fake hypervisor itself, or a TCP proxy in front of it.
    Raw,
    /// relay's CONNECT door.
    Connect { token: String },
    /// A WebSocket with subprotocol `binary`: relay (with a token) or websockify.
    Ws { token: Option<String> },
}

#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub door: Door,
}

pub enum Conn {
    Tcp(TcpStream),
    Ws(Box<WsConn>),
}

pub struct WsConn {
    ws: WebSocketStream<TcpStream>,
    pending: Bytes,
}

const CONNECT_OK: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";

/// WebSocket read buffer: tungstenite's default for bulk runs, small for idle sessions
/// (it only costs the bench's own memory, but 10,000 of them add up).
#[derive(Clone, Copy)]
pub enum Buffers {
    Bulk,
    Small,
}

impl Target {
    /// Opens a console: transport, door, RFB handshake through ServerInit.
    pub async fn open(&self, buffers: Buffers) -> Result<Conn> {
        let mut conn = self.transport(buffers).await?;
        rfb_handshake(&mut conn).await?;
        Ok(conn)
    }

    async fn transport(&self, buffers: Buffers) -> Result<Conn> {
        let tcp = TcpStream::connect(self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        match &self.door {
            Door::Raw => Ok(Conn::Tcp(tcp)),
            Door::Connect { token } => {
                let mut tcp = tcp;
                tcp.write_all(format!("CONNECT /console?token={token} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr).as_bytes()).await?;
                let mut answer = [0u8; CONNECT_OK.len()];
                tcp.read_exact(&mut answer).await.context("reading the CONNECT answer")?;
                if answer != CONNECT_OK {
                    bail!("CONNECT refused: {:?}", String::from_utf8_lossy(&answer));
                }
                Ok(Conn::Tcp(tcp))
            }
            Door::Ws { token } => {
                let url = match token {
                    Some(t) => format!("ws://{}/?token={t}", self.addr),
                    None => format!("ws://{}/", self.addr),
                };
                let mut request = url.into_client_request()?;
                request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
                let config = match buffers {
                    Buffers::Bulk => WebSocketConfig::default(),
                    Buffers::Small => WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0),
                }
                .max_message_size(Some(64 << 20))
                .max_frame_size(Some(64 << 20));
                let (ws, _) =
                    tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await.context("WebSocket handshake")?;
                Ok(Conn::Ws(Box::new(WsConn { ws, pending: Bytes::new() })))
            }
        }
    }
}

/// The viewer's side of RFB 3.8 with security None, then ClientInit and ServerInit.
async fn rfb_handshake(conn: &mut Conn) -> Result<()> {
    let mut version = [0u8; 12];
    conn.read_exact(&mut version).await.context("reading the RFB version")?;
    if &version != hv::VERSION {
        bail!("unexpected RFB version {:?}", String::from_utf8_lossy(&version));
    }
    conn.write_all(hv::VERSION).await?;
    let mut count = [0u8; 1];
    conn.read_exact(&mut count).await?;
    let mut types = vec![0u8; count[0] as usize];
    conn.read_exact(&mut types).await?;
    if !types.contains(&1) {
        bail!("security None not offered (types {types:?})");
    }
    conn.write_all(&[1]).await?;
    let mut result = [0u8; 4];
    conn.read_exact(&mut result).await?;
    if result != [0, 0, 0, 0] {
        bail!("security result {result:?}");
    }
    conn.write_all(&[1]).await?; // ClientInit: shared
    let mut init = [0u8; 24];
    conn.read_exact(&mut init).await.context("reading ServerInit")?;
    let name_len = u32::from_be_bytes(init[20..24].try_into().expect("4 bytes")) as usize;
    let mut name = vec![0u8; name_len];
    conn.read_exact(&mut name).await?;
    Ok(())
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed")
}

impl Conn {
    /// Sends bytes: as they are on TCP, as one binary message on a WebSocket.
    pub async fn send(&mut self, data: &Bytes) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(data).await,
            Conn::Ws(w) => w.ws.send(Message::Binary(data.clone())).await.map_err(std::io::Error::other),
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.send(&Bytes::copy_from_slice(data)).await
    }

    /// Receives whatever arrives next, at most `buf.len()` bytes; 0 at end of stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf).await,
            Conn::Ws(w) => {
                while w.pending.is_empty() {
                    match w.next_data().await? {
                        Some(b) => w.pending = b,
                        None => return Ok(0),
                    }
                }
                let n = buf.len().min(w.pending.len());
                buf[..n].copy_from_slice(&w.pending.split_to(n));
                Ok(n)
            }
        }
    }

    /// Receives and drops what arrives next (no copy on a WebSocket); 0 at end of stream.
    pub async fn discard(&mut self, scratch: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(scratch).await,
            Conn::Ws(w) => {
                if !w.pending.is_empty() {
                    return Ok(std::mem::take(&mut w.pending).len());
                }
                Ok(w.next_data().await?.map_or(0, |b| b.len()))
            }
        }
    }

    pub async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            let n = self.read(&mut buf[at..]).await?;
            if n == 0 {
                return Err(closed());
            }
            at += n;
        }
        Ok(())
    }
}

impl WsConn {
    /// The next binary message's payload; None at close or end of stream.
    async fn next_data(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                Some(Ok(Message::Close(_))) | None => return Ok(None),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
    }
}
