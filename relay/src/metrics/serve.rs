//! The metrics listener (`[metrics] listen`): `/metrics` for Prometheus, and the health
//! probes, on an address of its own that operators keep off the viewers' network.

use crate::app::App;
use crate::control::handler::ControlContext;
use crate::front::health;
use crate::wire::http::{Reject, RequestHead, read_head, response_head};
use crate::wire::prefixed::Prefixed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Scrapers served at once; more wait in the listen backlog.
const MAX_SCRAPERS: usize = 16;
/// Requests one connection may make (scrapers keep their connection alive).
const MAX_REQUESTS: usize = 1000;
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a request head, or an answer, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let scrapers = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok(permit) = scrapers.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let app = app.clone();
                tokio::spawn(async move {
                    connection(&app, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(app: &App, stream: TcpStream) {
    let mut stream = Prefixed::bare(stream);
    for _ in 0..MAX_REQUESTS {
        let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream, MAX_HEAD_BYTES)).await {
            Ok(Ok(Some(head))) => head,
            Ok(Err(reject)) => {
                let _ = tokio::time::timeout(IO_TIMEOUT, stream.io.write_all(&reject.to_bytes())).await;
                return;
            }
            Ok(Ok(None)) | Err(_) => return,
        };
        if head.header("content-length").is_some_and(|n| n.trim() != "0") || head.header("transfer-encoding").is_some() {
            let reject = Reject::new(400, "Bad Request", "requests to the metrics listener carry no body");
            let _ = tokio::time::timeout(IO_TIMEOUT, stream.io.write_all(&reject.to_bytes())).await;
            return;
        }
        let answer = respond(app, &head).await;
        let sent = tokio::time::timeout(IO_TIMEOUT, stream.io.write_all(&answer)).await;
        if !sent.is_ok_and(|w| w.is_ok()) || !head.keep_alive() {
            return;
        }
    }
}

async fn respond(app: &App, head: &RequestHead) -> Vec<u8> {
    if let Some(probe) = health::probe(head) {
        let ready = match probe {
            health::Probe::Ready => app.readiness().await,
            _ => Ok(()),
        };
        return health::respond(head, probe, ready);
    }
    let keep = head.keep_alive();
    if !matches!(head.method.as_str(), "GET" | "HEAD") {
        return Reject::new(405, "Method Not Allowed", "use GET").response(keep);
    }
    if head.path() != "/metrics" {
        return Reject::new(404, "Not Found", "relay serves /metrics, /healthz and /readyz here").response(keep);
    }
    let stats = match ControlContext::of(app).stats().await {
        Ok(stats) => stats,
        Err(e) => {
            debug!(error = %e, "metrics: the store did not answer");
            return Reject::new(503, "Service Unavailable", format!("metrics unavailable: {e}")).response(keep);
        }
    };
    // Prometheus asks for OpenMetrics when it can take it; anything else gets the
    // classic text format, which every scraper reads.
    let openmetrics = head.header("accept").is_some_and(|a| a.contains("application/openmetrics-text"));
    let body = super::render(stats, &app.timings, openmetrics);
    let kind = if openmetrics { super::OPENMETRICS } else { super::PROMETHEUS };
    let mut out = response_head(200, "OK", kind, body.len() as u64, keep).into_bytes();
    if head.method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}
