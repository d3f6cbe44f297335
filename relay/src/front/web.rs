//! Static files for the browser client (a noVNC checkout), served beside the
//! WebSocket door as nova-novncproxy does.

use crate::wire::http::{Reject, RequestHead, response_head};
use percent_encoding::percent_decode_str;
use std::path::{Component, Path, PathBuf};

/// Files larger than this are not served; a noVNC checkout's largest is under 1 MiB.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Maps a request path onto a file under `root`, refusing anything that could leave it.
/// `/` serves `vnc.html`, the full noVNC client, when there is no `index.html`.
pub fn resolve(root: &Path, request_path: &str) -> Result<PathBuf, Reject> {
    let not_found = || Reject::new(404, "Not Found", "no such file");
    let decoded = percent_decode_str(request_path).decode_utf8().map_err(|_| Reject::new(400, "Bad Request", "path is not UTF-8"))?;
    if !decoded.starts_with('/') || decoded.contains('\0') || decoded.contains('\\') {
        return Err(Reject::new(400, "Bad Request", "bad path"));
    }
    let mut path = root.to_path_buf();
    for component in Path::new(decoded.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            _ => return Err(not_found()),
        }
    }
    if path == root {
        let index = root.join("index.html");
        path = if index.is_file() { index } else { root.join("vnc.html") };
    }
    Ok(path)
}

pub fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "oga" | "ogg" => "audio/ogg",
        "mp3" => "audio/mpeg",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A response to a GET or HEAD: its head, and the file to send after it (GET).
pub struct FileResponse {
    pub head: Vec<u8>,
    pub body: Option<(tokio::fs::File, u64)>,
}

/// Opens the file behind a GET or HEAD; the caller sends it in pieces.
pub async fn respond(root: &Path, head: &RequestHead) -> Result<FileResponse, Reject> {
    if head.method != "GET" && head.method != "HEAD" {
        return Err(Reject::new(405, "Method Not Allowed", "only GET and HEAD are served").with_header("Allow", "GET, HEAD"));
    }
    let path = resolve(root, head.path())?;
    let not_found = || Reject::new(404, "Not Found", "no such file");
    let file = tokio::fs::File::open(&path).await.map_err(|_| not_found())?;
    let meta = file.metadata().await.map_err(|_| not_found())?;
    if !meta.is_file() {
        return Err(not_found());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Reject::new(500, "Internal Server Error", "file too large to serve"));
    }
    let response = response_head(200, "OK", content_type(&path), meta.len(), head.keep_alive()).into_bytes();
    Ok(FileResponse { head: response, body: (head.method == "GET").then_some((file, meta.len())) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        let root = Path::new("/srv/novnc");
        assert_eq!(resolve(root, "/core/rfb.js").unwrap(), Path::new("/srv/novnc/core/rfb.js"));
        assert_eq!(resolve(root, "/a/./b.js").unwrap(), Path::new("/srv/novnc/a/b.js"));
        for bad in ["/../etc/passwd", "/core/../../etc/passwd", "/%2e%2e/etc/passwd", "/a/%2E%2E/%2E%2E/x", "/..%2fetc"] {
            assert!(resolve(root, bad).is_err(), "{bad}");
        }
        assert_eq!(resolve(root, "/a\\..\\b").unwrap_err().status, 400);
        assert_eq!(resolve(root, "/a%00b").unwrap_err().status, 400);
        assert_eq!(resolve(root, "//evil.example/").unwrap(), Path::new("/srv/novnc/evil.example"), "never a redirect");
    }
}
