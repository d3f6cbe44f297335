//! The one I/O loop that runs a handshake machine over a stream.

use super::{Handshake, Progress, RfbError};
use crate::wire::prefixed::Prefixed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Unconsumed input a handshake may hold; every RFB handshake message is far smaller.
const MAX_PENDING: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Rfb(#[from] RfbError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection during the RFB handshake")]
    Closed,
}

/// Runs `machine` to completion over `stream`, starting with the bytes already read from
/// the peer; on success those are the bytes read past the handshake, which belong to what
/// follows. On failure, whatever the machine queued (a failure reason) has been sent.
pub async fn drive<H, S>(mut machine: H, stream: &mut Prefixed<S>) -> Result<H::Done, DriveError>
where
    H: Handshake,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Prefixed { prefix: buf, io: stream } = stream;
    let mut out = Vec::with_capacity(64);
    let mut chunk = [0u8; 2048];
    loop {
        let (used, progress) = machine.advance(buf, &mut out);
        buf.drain(..used);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
            out.clear();
        }
        match progress {
            Progress::Done(done) => return Ok(done),
            Progress::Failed(e) => return Err(e.into()),
            Progress::NeedMore if buf.len() >= MAX_PENDING => {
                return Err(RfbError::TooLong("handshake message").into());
            }
            Progress::NeedMore => {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(DriveError::Closed);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}
