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
