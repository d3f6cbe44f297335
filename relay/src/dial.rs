//! Connecting to the hypervisor's VNC server, including XenServer-style
//! `internal_access_path` (an HTTP CONNECT that must be answered 200 before RFB).

use crate::auth::Target;
use crate::wire::http::{HeadError, parse_response};
use crate::wire::prefixed::Prefixed;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Longest CONNECT reply head relay reads from a hypervisor.
const MAX_REPLY_HEAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("hypervisor answered the access path CONNECT with status {0}")]
    AccessPathStatus(u16),
    #[error("hypervisor closed the connection during the access path CONNECT")]
    AccessPathClosed,
    #[error("hypervisor's CONNECT reply: {0}")]
    AccessPathReply(#[from] HeadError),
    #[error("i/o error during the access path CONNECT: {0}")]
    AccessPathIo(std::io::Error),
}

/// Connects to the hypervisor; the stream comes with any RFB bytes that arrived behind the
/// CONNECT reply.
pub async fn dial(
    target: &Target,
    connect_timeout: Duration,
    keepalive: Option<&socket2::TcpKeepalive>,
) -> Result<Prefixed<TcpStream>, DialError> {
    let name = format!("{}:{}", target.host, target.port);
    let attempt = async {
        let addrs = tokio::net::lookup_host((target.host.as_str(), target.port)).await.map_err(|e| DialError::Resolve(name.clone(), e))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"));
        Err(DialError::Connect(name.clone(), e))
    };
    let mut stream = timeout(connect_timeout, attempt).await.map_err(|_| DialError::Timeout(name.clone()))??;
    // RFB is many small messages (input events, update requests): do not delay them.
    let _ = stream.set_nodelay(true);
    if let Some(keepalive) = keepalive {
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(keepalive);
    }
    let mut buffered = Vec::new();
    if let Some(path) = &target.internal_access_path {
        let exchange = access_path(&mut stream, path, &mut buffered);
        timeout(connect_timeout, exchange).await.map_err(|_| DialError::Timeout(name))??;
    }
    Ok(Prefixed::new(stream, buffered))
}

/// Sends the CONNECT and reads exactly the reply head; RFB bytes that came in the same
/// segment stay in `buffered` for the handshake.
async fn access_path(stream: &mut TcpStream, path: &str, buffered: &mut Vec<u8>) -> Result<(), DialError> {
    let request = format!("CONNECT {path} HTTP/1.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(DialError::AccessPathIo)?;
    let mut chunk = [0u8; 1024];
    loop {
        if let Some((status, len)) = parse_response(buffered, MAX_REPLY_HEAD)? {
            if status != 200 {
                return Err(DialError::AccessPathStatus(status));
            }
            buffered.drain(..len);
            return Ok(());
        }
        let n = stream.read(&mut chunk).await.map_err(DialError::AccessPathIo)?;
        if n == 0 {
            return Err(DialError::AccessPathClosed);
        }
        buffered.extend_from_slice(&chunk[..n]);
    }
}
