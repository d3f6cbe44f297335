//! Health endpoints for load balancers and orchestrators, on the WebSocket door's web
//! side: `/healthz` (the process answers) and `/readyz` (it takes consoles: not draining,
//! its store reachable), and `OPTIONS`, which is what HAProxy's default `option httpchk`
//! sends (`OPTIONS / HTTP/1.0`). They name no secret, so they skip the Host allow-list
//! (health checkers send an address, or no Host at all).

use crate::wire::http::{RequestHead, response_head};

/// Whether relay takes consoles now; `Err` says why not.
pub type Readiness = Result<(), String>;

pub enum Probe {
    Alive,
    Ready,
    Options,
}

/// The health request `head` is, if any.
pub fn probe(head: &RequestHead) -> Option<Probe> {
    match (head.method.as_str(), head.path()) {
        ("OPTIONS", _) => Some(Probe::Options),
        ("GET" | "HEAD", "/healthz") => Some(Probe::Alive),
        ("GET" | "HEAD", "/readyz") => Some(Probe::Ready),
        _ => None,
    }
}

/// The whole response to a probe (`ready` matters only to `/readyz`).
pub fn respond(head: &RequestHead, probe: Probe, ready: Readiness) -> Vec<u8> {
    let keep = head.keep_alive();
    let (status, phrase, body) = match probe {
        Probe::Options => {
            let mut h = response_head(200, "OK", "text/plain; charset=utf-8", 0, keep);
            h.insert_str(h.len() - 2, "Allow: GET, HEAD, OPTIONS\r\n");
            return h.into_bytes();
        }
        Probe::Alive => (200, "OK", "alive\n".to_string()),
        Probe::Ready => match ready {
            Ok(()) => (200, "OK", "ready\n".to_string()),
            Err(why) => (503, "Service Unavailable", format!("not ready: {why}\n")),
        },
    };
    let mut out = response_head(status, phrase, "text/plain; charset=utf-8", body.len() as u64, keep).into_bytes();
    if head.method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::http::parse_request;

    fn answer(raw: &str, ready: Readiness) -> Option<String> {
        let head = parse_request(raw.as_bytes(), 4096).unwrap().unwrap().0;
        let p = probe(&head)?;
        Some(String::from_utf8(respond(&head, p, ready)).unwrap())
    }

    #[test]
    fn probes_and_their_answers() {
        let options = answer("OPTIONS / HTTP/1.0\r\n\r\n", Ok(())).unwrap();
        assert!(options.starts_with("HTTP/1.1 200 OK\r\n") && options.contains("Connection: close") && options.ends_with("\r\n\r\n"));
        assert!(answer("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Err("draining".into())).unwrap().ends_with("\r\n\r\nalive\n"));
        let ready = answer("GET /readyz HTTP/1.1\r\n\r\n", Ok(())).unwrap();
        assert!(ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"));
        let not = answer("GET /readyz?verbose HTTP/1.1\r\n\r\n", Err("draining".into())).unwrap();
        assert!(not.starts_with("HTTP/1.1 503") && not.ends_with("not ready: draining\n"));
        assert!(answer("HEAD /readyz HTTP/1.1\r\n\r\n", Ok(())).unwrap().ends_with("\r\n\r\n"), "HEAD has no body");
        assert!(answer("GET /vnc.html HTTP/1.1\r\n\r\n", Ok(())).is_none());
        assert!(answer("POST /healthz HTTP/1.1\r\n\r\n", Ok(())).is_none());
    }
}
