//! A small real RFB viewer for tests, over any stream: security None or VNC password
//! in 3.3/3.7/3.8, ServerInit, and a full framebuffer in raw encoding.

use relay::rfb::vnc_auth;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewerError {
    #[error("server refused: {0}")]
    Refused(String),
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("server wants a password and none was given")]
    NeedsPassword,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
}

/// Writes and flushes: over a WebSocket, bytes leave only on a flush.
async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

async fn reason<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, ViewerError> {
    let len = s.read_u32().await? as usize;
    if len > 4096 {
        return Err(ViewerError::Protocol(format!("reason of {len} bytes")));
    }
    let mut text = vec![0u8; len];
    s.read_exact(&mut text).await?;
    Ok(String::from_utf8_lossy(&text).trim_end_matches('\0').to_string())
}

/// Negotiates as a viewer speaking `version`, then ClientInit (shared) and ServerInit.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    version: &[u8; 12],
    password: Option<&str>,
) -> Result<ServerInit, ViewerError> {
    tokio::time::timeout(Duration::from_secs(20), negotiate(s, version, password)).await.map_err(|_| ViewerError::Timeout)?
}

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    version: &[u8; 12],
    password: Option<&str>,
) -> Result<ServerInit, ViewerError> {
    let mut greeting = [0u8; 12];
    s.read_exact(&mut greeting).await?;
    if !greeting.starts_with(b"RFB ") {
        return Err(ViewerError::Protocol(format!("greeting {:?}", String::from_utf8_lossy(&greeting))));
    }
    send(s, version).await?;
    let v33 = version == b"RFB 003.003\n";
    let v38 = version == b"RFB 003.008\n";
    let chosen = if v33 {
        match s.read_u32().await? {
            0 => return Err(ViewerError::Refused(reason(s).await?)),
            t => t as u8,
        }
    } else {
        let n = s.read_u8().await?;
        if n == 0 {
            return Err(ViewerError::Refused(reason(s).await?));
        }
        let mut types = vec![0u8; n as usize];
        s.read_exact(&mut types).await?;
        let pick = if password.is_some() && types.contains(&2) {
            2
        } else if types.contains(&1) {
            1
        } else if types.contains(&2) {
            return Err(ViewerError::NeedsPassword);
        } else {
            return Err(ViewerError::Protocol(format!("offered {types:?}")));
        };
        send(s, &[pick]).await?;
        pick
    };
    if chosen == 2 {
        let Some(password) = password else { return Err(ViewerError::NeedsPassword) };
        let mut challenge = [0u8; 16];
        s.read_exact(&mut challenge).await?;
        send(s, &vnc_auth::response(password.as_bytes(), &challenge)).await?;
    }
    if chosen == 2 || v38 {
        let result = s.read_u32().await?;
        if result != 0 {
            let why = if v38 { reason(s).await? } else { String::new() };
            return Err(ViewerError::AuthFailed(why));
        }
    }
    send(s, &[1]).await?; // ClientInit: shared
    let width = s.read_u16().await?;
    let height = s.read_u16().await?;
    let mut format = [0u8; 16];
    s.read_exact(&mut format).await?;
    let name = reason(s).await?;
    Ok(ServerInit { width, height, name })
}

/// Asks for the whole screen in 32-bit raw pixels until it shows at least two colours
/// (a freshly started VM draws its first screen after a moment); follows size changes.
pub async fn framebuffer<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, init: &ServerInit) -> Result<Vec<u8>, ViewerError> {
    let (mut w, mut h) = (init.width, init.height);
    resized_framebuffer(s, (&mut w, &mut h)).await
}

/// [`framebuffer`] from a screen of `w`×`h`, left at the size the server ended at (it may
/// resize the screen meanwhile), for a later update to start from.
pub async fn resized_framebuffer<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    (w, h): (&mut u16, &mut u16),
) -> Result<Vec<u8>, ViewerError> {
    tokio::time::timeout(Duration::from_secs(30), read_screen(s, (w, h))).await.map_err(|_| ViewerError::Timeout)?
}

async fn read_screen<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, size: (&mut u16, &mut u16)) -> Result<Vec<u8>, ViewerError> {
    let mut msg = vec![0u8, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]; // SetPixelFormat
    msg.extend_from_slice(&[2, 0, 0, 2, 0, 0, 0, 0]); // SetEncodings: Raw,
    msg.extend_from_slice(&(-223i32).to_be_bytes()); // DesktopSize
    send(s, &msg).await?;
    let (mut w, mut h) = (*size.0 as usize, *size.1 as usize);
    loop {
        let pixels = read_frame(s, &mut w, &mut h).await?;
        (*size.0, *size.1) = (w as u16, h as u16);
        if distinct_colours(&pixels) >= 2 {
            return Ok(pixels);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whole frames one after another for `time`, after [`resized_framebuffer`] has set the
/// pixel format: a console busy enough for relay to move it to the kernel. Returns the
/// bytes of pixels that came.
pub async fn busy_for<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    (w, h): (&mut u16, &mut u16),
    time: Duration,
) -> Result<usize, ViewerError> {
    let until = tokio::time::Instant::now() + time;
    let (mut fw, mut fh) = (*w as usize, *h as usize);
    let mut bytes = 0;
    while tokio::time::Instant::now() < until {
        bytes +=
            tokio::time::timeout(Duration::from_secs(30), read_frame(s, &mut fw, &mut fh)).await.map_err(|_| ViewerError::Timeout)??.len();
    }
    (*w, *h) = (fw as u16, fh as u16);
    Ok(bytes)
}

/// One full, non-incremental frame.
async fn read_frame<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, w: &mut usize, h: &mut usize) -> Result<Vec<u8>, ViewerError> {
    let request = |w: usize, h: usize| {
        let mut m = vec![3u8, 0, 0, 0, 0, 0];
        m.extend_from_slice(&(w as u16).to_be_bytes());
        m.extend_from_slice(&(h as u16).to_be_bytes());
        m
    };
    send(s, &request(*w, *h)).await?;
    let mut pixels = vec![0u8; *w * *h * 4];
    let mut covered = 0usize;
    while covered < *w * *h {
        match s.read_u8().await? {
            0 => {
                s.read_u8().await?;
                for _ in 0..s.read_u16().await? {
                    let (x, y, rw, rh) = (
                        s.read_u16().await? as usize,
                        s.read_u16().await? as usize,
                        s.read_u16().await? as usize,
                        s.read_u16().await? as usize,
                    );
                    match s.read_i32().await? {
                        -223 => {
                            // The screen changed size: start over at the new one.
                            (*w, *h) = (rw, rh);
                            pixels = vec![0u8; rw * rh * 4];
                            covered = 0;
                            send(s, &request(rw, rh)).await?;
                        }
                        0 if x + rw <= *w && y + rh <= *h => {
                            for row in y..y + rh {
                                let start = (row * *w + x) * 4;
                                s.read_exact(&mut pixels[start..start + rw * 4]).await?;
                            }
                            covered += rw * rh;
                        }
                        e => return Err(ViewerError::Protocol(format!("rectangle {x},{y} {rw}x{rh} encoding {e}"))),
                    }
                }
            }
            1 => {
                let mut head = [0u8; 5];
                s.read_exact(&mut head).await?;
                let n = u16::from_be_bytes([head[3], head[4]]) as usize;
                let mut skip = vec![0u8; n * 6];
                s.read_exact(&mut skip).await?;
            }
            2 => {}
            3 => {
                let mut pad = [0u8; 3];
                s.read_exact(&mut pad).await?;
                let _ = reason(s).await?;
            }
            t => return Err(ViewerError::Protocol(format!("server message type {t}"))),
        }
    }
    Ok(pixels)
}

/// How many different colours a 32-bit framebuffer shows.
pub fn distinct_colours(pixels: &[u8]) -> usize {
    let colours: std::collections::HashSet<[u8; 3]> = pixels.chunks_exact(4).map(|p| [p[0], p[1], p[2]]).collect();
    colours.len()
}
