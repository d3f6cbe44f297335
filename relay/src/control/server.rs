//! The control socket server. The socket is mode 0600 in a directory relay makes
//! private, and each peer's credentials are checked: only relay's own user (or root)
//! may use it.

use super::handler::{ControlContext, handle};
use super::proto::{ControlError, Envelope, ErrorKind, MAX_LINE, Reply};
use crate::app::App;
use crate::reserve::{Reserve, out_of_descriptors};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

/// Binds the socket. Refuses a directory that someone else could swap the socket in, and
/// to take over a socket another relay is serving.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        check_private_dir(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is in use by a running relay", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Whether only relay's user (or root) can replace what is in `dir`: it must belong to
/// relay's user or root, and others may not write to it unless the sticky bit keeps them
/// to their own files. A directory another user made (say `/tmp/relay-<uid>`, created
/// first by someone else) would let that user put an impostor in the socket's place.
pub fn check_private_dir(dir: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    let me = std::fs::metadata("/proc/self")?.uid();
    let refuse =
        |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("control socket directory {}: {why}", dir.display())));
    if meta.uid() != me && meta.uid() != 0 {
        return refuse(format!(
            "it belongs to uid {}, not to relay's user (uid {me}) or root; remove it or choose another --control path",
            meta.uid()
        ));
    }
    let sticky = meta.mode() & 0o1000 != 0;
    if meta.mode() & 0o022 != 0 && !sticky {
        return refuse(format!("others may write to it (mode {:o}); make it 0700", meta.mode() & 0o7777));
    }
    Ok(())
}

/// Serves until the task is dropped.
pub async fn serve(app: Arc<App>, listener: UnixListener, path: PathBuf) {
    let owner = std::fs::metadata(&path).map(|m| m.uid()).ok();
    // Out of descriptors, the operator still gets in: the reserve one is given up for
    // the control client, and taken back at the next accept.
    let reserve = Reserve::new();
    loop {
        reserve.refill();
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) if out_of_descriptors(&e) && reserve.release() => continue,
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(&app, stream, owner).await {
                debug!(error = %e, "control client ended");
            }
        });
    }
}

async fn serve_client(app: &App, mut stream: UnixStream, owner: Option<u32>) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    if uid != 0 && Some(uid) != owner {
        warn!(uid, "control socket: peer is not relay's user; refused");
        let reply = Reply::from(Err(ControlError::new(ErrorKind::Forbidden, "only relay's own user may use the control socket")));
        return write_reply(&mut stream, &reply).await;
    }
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Read at most one line's worth; a longer line is an error, not a bigger buffer.
        let n = (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_LINE {
            let reply = Reply::from(Err(ControlError::new(ErrorKind::BadRequest, format!("request longer than {MAX_LINE} bytes"))));
            return write_reply(&mut write, &reply).await;
        }
        let reply = match parse_line(&line) {
            Ok(None) => continue,
            Ok(Some(envelope)) => Reply::from(handle(&ControlContext::of(app), envelope).await),
            Err(e) => Reply::from(Err(e)),
        };
        write_reply(&mut write, &reply).await?;
    }
}

/// One request line as it came off the socket: a request, nothing (a blank line), or why
/// it is not one. Anything at all gets an answer, never a dropped connection.
pub fn parse_line(line: &[u8]) -> Result<Option<Envelope>, ControlError> {
    let bad = |m: String| ControlError::new(ErrorKind::BadRequest, m);
    let text = std::str::from_utf8(line).map_err(|e| bad(format!("not a valid request: not UTF-8 ({e})")))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str::<Envelope>(text).map(Some).map_err(|e| bad(format!("not a valid request: {e}")))
}

async fn write_reply<W: AsyncWriteExt + Unpin>(w: &mut W, reply: &Reply) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_others_may_write_to_is_refused() {
        let dir = std::env::temp_dir().join(format!("relay-ctl-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind(&dir.join("control.sock")).await.unwrap_err();
        assert!(err.to_string().contains("others may write to it"), "{err}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(bind(&dir.join("control.sock")).await.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    #[cfg_attr(relay_no_setpriv, ignore = "needs root, to hand a directory to another user")]
    async fn a_directory_another_user_owns_is_refused() {
        let dir = std::env::temp_dir().join(format!("relay-ctl-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = bind(&dir.join("control.sock")).await.unwrap_err();
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn any_line_is_a_request_a_blank_or_a_bad_request() {
        assert!(matches!(parse_line(b"{\"op\":\"stats\"}\n"), Ok(Some(_))));
        assert!(matches!(parse_line(b"  \r\n"), Ok(None)));
        for bad in [&b"\xff\xfe{\"op\":\"stats\"}\n"[..], b"{\"op\":\"nope\"}", b"[1,2"] {
            let e = parse_line(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{bad:?}");
        }
        assert!(parse_line(b"\xff\n").unwrap_err().message.contains("UTF-8"));
    }
}
