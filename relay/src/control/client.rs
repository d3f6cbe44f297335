//! The control protocol's client, as `relay ctl` and tests use it.

use super::proto::{ControlError, Envelope, Reply, Request};
use serde_json::Value;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach relay's control socket {0}: {1} (is `relay run` running, with the same --control?)")]
    Connect(String, std::io::Error),
    #[error("{0}: nothing was sent")]
    Untrusted(String),
    #[error("control socket i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("relay sent a reply that is not valid: {0}")]
    BadReply(String),
    #[error(transparent)]
    Refused(#[from] ControlError),
}

/// Sends one request and reads its result as `T`, the operation's reply type
/// ([`super::replies`]).
pub async fn call<T: serde::de::DeserializeOwned>(path: &Path, request: Request) -> Result<T, ClientError> {
    let result = self::request(path, &Envelope::new(request)).await?;
    serde_json::from_value(result).map_err(|e| ClientError::BadReply(e.to_string()))
}

/// Sends one request; its result as JSON.
pub async fn request(path: &Path, envelope: &Envelope) -> Result<Value, ClientError> {
    let stream = UnixStream::connect(path).await.map_err(|e| ClientError::Connect(path.display().to_string(), e))?;
    let server = stream.peer_cred().map_err(|e| ClientError::Connect(path.display().to_string(), e))?.uid();
    trust_server(path, server).map_err(ClientError::Untrusted)?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(envelope).map_err(|e| ClientError::BadReply(e.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut reply = String::new();
    BufReader::new(read).read_line(&mut reply).await?;
    if reply.is_empty() {
        return Err(ClientError::BadReply("connection closed without a reply".into()));
    }
    let reply: Reply = serde_json::from_str(&reply).map_err(|e| ClientError::BadReply(e.to_string()))?;
    Ok(Result::from(reply)?)
}

/// Whether the process serving `path` (uid `server`) may be told secrets: root, or this
/// user. Root also trusts the socket's owner where only root could have given it the
/// directory (a service's runtime directory, `/run/relay` for `User=relay`): the
/// directory belongs to that user and sits in one that belongs to root and that no one
/// else may write to. Anything else may be an impostor put in relay's place.
fn trust_server(path: &Path, server: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").map_err(|e| e.to_string())?.uid();
    if server == 0 || server == me {
        return Ok(());
    }
    let placed_by_root = || -> Option<bool> {
        let dir = path.parent()?;
        let (dir_meta, parent_meta) = (std::fs::metadata(dir).ok()?, std::fs::metadata(dir.parent()?).ok()?);
        Some(dir_meta.uid() == server && parent_meta.uid() == 0 && parent_meta.mode() & 0o022 == 0)
    };
    if me == 0 && placed_by_root() == Some(true) {
        return Ok(());
    }
    Err(format!("the control socket {} is served by uid {server}, neither root nor you (uid {me}); it may be an impostor", path.display()))
}
