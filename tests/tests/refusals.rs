//! Requests that must not get a console, on both doors, each with a clear HTTP answer
//! and a closed connection; and the web client's files.

use relay_tests::relay_server::{TestRelay, new_token, read_head, scratch_dir};
use relay_tests::viewer::{ViewerError, handshake};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Error as WsError;

/// A hypervisor address nothing listens on: refusals happen before relay dials.
const NOWHERE: &str = "127.0.0.1:9";

fn status(err: WsError) -> u16 {
    match err {
        WsError::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

async fn raw(relay_addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(relay_addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("relay closes").unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn websocket_refusals() {
    let relay = TestRelay::start().await;
    let token = relay.token("vm", NOWHERE.parse().unwrap()).await;

    let cross_site = relay.websocket(&format!("/?token={token}"), &[("Origin", "http://evil.example")]).await;
    assert_eq!(status(cross_site.err().unwrap()), 403);
    assert_eq!(status(relay.websocket("/", &[]).await.err().unwrap()), 400, "no token");
    assert_eq!(status(relay.websocket("/?token=AAAA", &[]).await.err().unwrap()), 403, "unknown token");

    let mut short = new_token("vm", NOWHERE.parse().unwrap());
    short.ttl = Some(1);
    let short = relay.token_with(short).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status(relay.websocket(&format!("/?token={short}"), &[]).await.err().unwrap()), 403, "expired");

    // The cross-site attempt above did not spend the token: Origin is checked first.
    let check = relay.ctl(relay::control::proto::Request::TokenCheck { token: token.clone() }).await.unwrap();
    assert_eq!(check["valid"], true);
    let stats = relay.ctl(relay::control::proto::Request::Stats).await.unwrap();
    assert_eq!(stats["counters"]["token_rejections"], 2);
    assert_eq!(stats["sessions_active"], 0);
}

#[tokio::test]
async fn connect_door_refusals_say_why() {
    let relay = TestRelay::start().await;
    let err = relay.connect_door("AAAA").await.unwrap_err();
    assert!(err.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{err}");
    assert!(err.ends_with("unknown console token\n"), "{err}");

    let mut once = new_token("vm", NOWHERE.parse().unwrap());
    once.single_use = true;
    let once = relay.token_with(once).await;
    let first = relay.connect_door(&once).await.unwrap_err();
    assert!(first.starts_with("HTTP/1.1 502 Bad Gateway"), "hypervisor down: {first}");
    assert!(first.contains("cannot reach the hypervisor"), "{first}");
    assert!(!first.contains("127.0.0.1:9"), "the viewer is not told internal addresses: {first}");
    let second = relay.connect_door(&once).await.unwrap_err();
    assert!(second.ends_with("console token was already used\n"), "{second}");

    let get = raw(relay.connect, b"GET /console?token=x HTTP/1.1\r\n\r\n").await;
    assert!(get.starts_with("HTTP/1.1 405 "), "{get}");
    let none = raw(relay.connect, b"CONNECT /console HTTP/1.1\r\n\r\n").await;
    assert!(none.starts_with("HTTP/1.1 400 ") && none.contains("no console token"), "{none}");
}

#[tokio::test]
async fn malformed_oversize_and_slow_requests_are_closed() {
    let relay = TestRelay::start_with(|c| c.limits.handshake_timeout_secs = 1).await;
    let garbage = raw(relay.connect, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03").await;
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage:?}");
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(10_000));
    assert!(raw(relay.ws, big.as_bytes()).await.starts_with("HTTP/1.1 431 "));
    let slow = raw(relay.ws, b"GET /?token=x HTTP/1.1\r\nHost: a\r\n").await;
    assert!(slow.starts_with("HTTP/1.1 408 "), "{slow:?}");
    // A connection that never sends anything is closed quietly after the timeout.
    assert_eq!(raw(relay.connect, b"").await, "");
}

#[tokio::test]
async fn web_client_files_are_served_and_traversal_is_not() {
    let web = scratch_dir("web");
    std::fs::create_dir_all(web.join("core")).unwrap();
    std::fs::write(web.join("vnc_lite.html"), "<html>lite</html>").unwrap();
    std::fs::write(web.join("core/rfb.js"), "export default 1;").unwrap();
    std::fs::write(web.parent().unwrap().join("secret.txt"), "secret").unwrap();
    let root = web.clone();
    let relay = TestRelay::start_with(move |c| c.listen.web = Some(root)).await;

    let mut s = TcpStream::connect(relay.ws).await.unwrap();
    s.write_all(b"GET /vnc_lite.html HTTP/1.1\r\nHost: a\r\n\r\nGET /core/rfb.js HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let first = read_head(&mut s).await.unwrap();
    assert!(first.contains("Content-Type: text/html") && first.contains("Content-Length: 17"), "{first}");
    let mut body = [0u8; 17];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"<html>lite</html>");
    let second = read_head(&mut s).await.unwrap();
    assert!(second.contains("Content-Type: text/javascript"), "keep-alive serves the next request: {second}");

    for path in ["/../secret.txt", "/%2e%2e/secret.txt", "/core/../../secret.txt", "/nope.html"] {
        let reply = raw(relay.ws, format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 404 "), "{path}: {reply}");
        assert!(!reply.contains("secret"), "{path}");
    }
    let post = raw(relay.ws, b"POST /vnc_lite.html HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    let _ = std::fs::remove_dir_all(&web);
}

#[tokio::test]
async fn x_forwarded_proto_counts_for_the_origin_scheme_only_when_trusted() {
    let headers = [("Origin", "https://console.example"), ("Host", "console.example"), ("X-Forwarded-Proto", "https")];
    let trusting = TestRelay::start_with(|c| c.websocket.trust_forwarded_headers = true).await;
    let token = trusting.token("vm", NOWHERE.parse().unwrap()).await;
    assert!(trusting.websocket(&format!("/?token={token}"), &headers).await.is_ok(), "https page behind a TLS proxy");

    let plain = TestRelay::start().await;
    let token = plain.token("vm", NOWHERE.parse().unwrap()).await;
    assert_eq!(status(plain.websocket(&format!("/?token={token}"), &headers).await.err().unwrap()), 403);
}

/// A hypervisor that accepts and never speaks: when the handshake time runs out, the viewer
/// is told why in RFB's own failure reason, on both doors, not left with a bare close.
#[tokio::test]
async fn a_silent_hypervisor_gives_the_viewer_a_reason() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let relay = TestRelay::start_with(|c| c.limits.handshake_timeout_secs = 1).await;
    let token = relay.token("vm-silent", addr).await;
    let mut viewer = relay.connect_door(&token).await.expect("200: the hypervisor accepted");
    let refused = handshake(&mut viewer, b"RFB 003.008\n", None).await;
    assert!(
        matches!(&refused, Err(ViewerError::Refused(why)) if why == "console unavailable: the hypervisor did not answer in time"),
        "{refused:?}"
    );
    let token = relay.token("vm-silent-ws", addr).await;
    let mut ws = relay.websocket(&format!("/?token={token}"), &[]).await.expect("upgrade");
    let refused = handshake(&mut ws, b"RFB 003.008\n", None).await;
    assert!(matches!(&refused, Err(ViewerError::Refused(why)) if why.ends_with("did not answer in time")), "{refused:?}");
}

/// A body on a web request is read and dropped, never parsed as the next request (which
/// behind a connection-reusing proxy lets one client's request answer another's), and
/// relay closes when it says it closes.
#[tokio::test]
async fn web_request_bodies_cannot_smuggle_a_request() {
    let web = scratch_dir("web-body");
    std::fs::write(web.join("vnc_lite.html"), "<html>lite</html>").unwrap();
    std::fs::write(web.join("secret.js"), "smuggled").unwrap();
    let root = web.clone();
    let relay = TestRelay::start_with(move |c| c.listen.web = Some(root)).await;

    let hidden = "GET /secret.js HTTP/1.1\r\nHost: a\r\n\r\n";
    let request = format!(
        "GET /vnc_lite.html HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{hidden}GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        hidden.len()
    );
    let replies = raw(relay.ws, request.as_bytes()).await;
    assert_eq!(replies.matches("HTTP/1.1 ").count(), 2, "one answer per request, the body none: {replies}");
    assert!(!replies.contains("smuggled"), "{replies}");
    assert!(replies.contains("HTTP/1.1 404 ") && replies.ends_with("no such file\n"), "{replies}");

    // A 404 on a keep-alive connection says so, and the connection serves on.
    let mut s = TcpStream::connect(relay.ws).await.unwrap();
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let missing = read_head(&mut s).await.unwrap();
    assert!(missing.contains("Connection: keep-alive"), "{missing}");
    s.write_all(b"GET /vnc_lite.html HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert!(read_head(&mut s).await.unwrap().starts_with("HTTP/1.1 200"));

    for (bad, status) in [("Transfer-Encoding: chunked\r\n", "400"), ("Content-Length: 1000000\r\n", "413")] {
        let reply = raw(relay.ws, format!("GET /vnc_lite.html HTTP/1.1\r\n{bad}\r\n").as_bytes()).await;
        assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")) && reply.contains("Connection: close"), "{bad}: {reply}");
    }
    let _ = std::fs::remove_dir_all(&web);
}

/// A client that asks for a large file and reads nothing is disconnected after the send
/// timeout; relay sends files in pieces and holds one piece for it, not the file.
#[tokio::test]
async fn a_web_client_that_stops_reading_is_disconnected() {
    let web = scratch_dir("web-slow");
    let big = vec![b'x'; 8 << 20];
    std::fs::write(web.join("big.js"), &big).unwrap();
    let root = web.clone();
    let relay = TestRelay::start_with(move |c| {
        c.listen.web = Some(root);
        c.limits.web_send_timeout_secs = 1;
    })
    .await;
    let mut s = TcpStream::connect(relay.ws).await.unwrap();
    s.write_all(b"GET /big.js HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await.expect("relay ended the response");
    assert!(got.len() < big.len(), "the slow client was cut off ({} of {} bytes)", got.len(), big.len());
    let _ = std::fs::remove_dir_all(&web);
}

/// With `allowed_hosts` set, a request naming another Host (a rebound DNS name) gets no
/// console and no page, although its Origin matches its Host.
#[tokio::test]
async fn hosts_outside_allowed_hosts_are_refused() {
    let relay = TestRelay::start_with(|c| c.websocket.allowed_hosts = vec!["console.example.com".into()]).await;
    let upgrade = |host: &str| {
        format!(
            "GET /?token=t HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let rebound = raw(relay.ws, upgrade("evil.example").as_bytes()).await;
    assert!(rebound.starts_with("HTTP/1.1 403 ") && rebound.contains("allowed_hosts"), "{rebound}");
    let page = raw(relay.ws, b"GET /vnc.html HTTP/1.1\r\nHost: evil.example\r\n\r\n").await;
    assert!(page.starts_with("HTTP/1.1 403 "), "{page}");
    // The name viewers use passes the Host check (and reaches the token check).
    let served = raw(relay.ws, upgrade("console.example.com:6080").as_bytes()).await;
    assert!(served.starts_with("HTTP/1.1 403 ") && served.contains("unknown console token"), "{served}");
}

/// One source cannot take every place under max_connections: past its share it gets 503
/// at once, and another address is served meanwhile. Behind a trusted proxy, the share
/// is the reported client's.
#[tokio::test]
async fn one_source_cannot_fill_the_connection_limit() {
    let relay = TestRelay::start_with(|c| {
        c.limits.max_connections = 20;
        c.limits.max_connections_per_source = 5;
    })
    .await;
    let from = |ip: &str| {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(relay.ws)
    };
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(from("127.0.0.1").await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut sixth = from("127.0.0.1").await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(2), sixth.read_to_string(&mut reply)).await.expect("answered at once").unwrap();
    assert!(reply.starts_with("HTTP/1.1 503 ") && reply.contains("too many connections from your address"), "{reply}");
    let mut other = from("127.0.0.2").await.unwrap();
    other.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(2), other.read_to_string(&mut reply)).await.expect("served at once").unwrap();
    assert!(reply.starts_with("HTTP/1.1 404 "), "another source is served: {reply}");
    drop(silent);

    let proxied = TestRelay::start_with(|c| {
        c.limits.max_connections_per_source = 1;
        c.websocket.trust_forwarded_headers = true;
    })
    .await;
    // A first client's console, held in its hypervisor handshake (the hypervisor is silent).
    let silent_hv = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = proxied.token("vm-held", silent_hv.local_addr().unwrap()).await;
    let head = |client: &str, token: &str| {
        format!(
            "GET /?token={token} HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {client}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let mut held = TcpStream::connect(proxied.ws).await.unwrap();
    held.write_all(head("198.51.100.7", &token).as_bytes()).await.unwrap();
    assert!(read_head(&mut held).await.unwrap().starts_with("HTTP/1.1 101"));
    // A second from the same client is over its share; one from another client is not.
    let same = raw(proxied.ws, head("198.51.100.7", "t").as_bytes()).await;
    assert!(same.starts_with("HTTP/1.1 503 "), "{same}");
    let other = raw(proxied.ws, head("198.51.100.8", "t").as_bytes()).await;
    assert!(other.starts_with("HTTP/1.1 403 ") && other.contains("unknown console token"), "{other}");
}
