//! What running relay as an appliance needs around the console path: health answers a load
//! balancer understands (HTTP/1.0 and `OPTIONS` included), and TCP keepalive on both legs.

use relay_tests::fake_hypervisor::{FakeVnc, Script};
use relay_tests::relay_server::TestRelay;
use relay_tests::viewer::handshake;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RFB38: &[u8; 12] = b"RFB 003.008\n";

/// Sends `request` and reads until relay closes (or 5 s of keep-alive silence).
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn health_endpoints_answer_http_1_0_and_options_without_a_web_client() {
    let relay = TestRelay::start_with(|c| c.websocket.allowed_hosts = vec!["console.example.com".into()]).await;
    // HAProxy's default `option httpchk`: no Host header at all.
    let options = exchange(relay.ws, "OPTIONS / HTTP/1.0\r\n\r\n").await;
    assert!(options.starts_with("HTTP/1.1 200 OK\r\n"), "{options}");
    assert!(options.contains("Connection: close"), "an HTTP/1.0 request is answered, then closed");
    let alive = exchange(relay.ws, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(alive.starts_with("HTTP/1.1 200") && alive.ends_with("alive\n"), "{alive}");
    let ready = exchange(relay.ws, "GET /readyz HTTP/1.1\r\nHost: 10.1.2.3\r\nConnection: close\r\n\r\n").await;
    assert!(ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"), "{ready}");
    // Two probes on one HTTP/1.1 connection.
    let both = exchange(relay.ws, "HEAD /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(both.matches("HTTP/1.1 200 OK").count(), 2, "{both}");
    // Everything else still goes through the Host allow-list and the web client rules.
    let other = exchange(relay.ws, "GET /vnc.html HTTP/1.0\r\nHost: 10.1.2.3\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");
}

#[tokio::test]
async fn readyz_says_not_ready_while_draining_and_new_consoles_are_refused() {
    let hv = FakeVnc::start(Script::echo()).await;
    let mut relay = TestRelay::start_with(|c| c.limits.drain_secs = 3).await;
    let token = relay.token("vm-drain", hv.addr()).await;
    let mut live = relay.connect_door(&token).await.unwrap();
    handshake(&mut live, RFB38, None).await.unwrap();
    relay.shut_down();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = exchange(relay.ws, "GET /readyz HTTP/1.0\r\n\r\n").await;
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("draining"), "{ready}");
    let refused = relay.connect_door(&token).await.err().unwrap_or_default();
    assert!(refused.contains("503"), "{refused}");
    live.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    live.read_exact(&mut back).await.expect("a live console goes on while draining");
}

/// relay's socket whose local (`side` 2) or peer (`side` 3) address is `addr`, as `ss`
/// shows it, once its timer is not a retransmission's (which `ss` shows instead).
async fn socket_line(addr: SocketAddr, side: usize) -> String {
    let mut line = String::new();
    for _ in 0..50 {
        let ss = std::process::Command::new("ss").args(["-tnoH", "state", "established"]).output().expect("ss (iproute2)");
        let table = String::from_utf8_lossy(&ss.stdout).into_owned();
        line = table.lines().find(|l| l.split_whitespace().nth(side) == Some(&addr.to_string())).unwrap_or_default().to_string();
        if !line.is_empty() && !line.contains("timer:(on") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    line
}

/// Both of relay's sockets of a console carry a keepalive timer.
#[tokio::test]
async fn both_legs_of_a_console_have_tcp_keepalive() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let token = relay.token("vm-ka", hv.addr()).await;
    let mut console = relay.connect_door(&token).await.unwrap();
    handshake(&mut console, RFB38, None).await.unwrap();
    let viewer_leg = socket_line(relay.connect, 2).await;
    let hv_leg = socket_line(hv.addr(), 3).await;
    assert!(viewer_leg.contains("timer:(keepalive,59sec") || viewer_leg.contains("timer:(keepalive,1min"), "viewer leg: {viewer_leg:?}");
    assert!(hv_leg.contains("timer:(keepalive"), "hypervisor leg: {hv_leg:?}");

    let off = TestRelay::start_with(|c| c.keepalive.tcp_idle_secs = 0).await;
    let token = off.token("vm-ka-off", hv.addr()).await;
    let mut console = off.connect_door(&token).await.unwrap();
    handshake(&mut console, RFB38, None).await.unwrap();
    let viewer_leg = socket_line(off.connect, 2).await;
    assert!(!viewer_leg.is_empty() && !viewer_leg.contains("keepalive"), "off means off: {viewer_leg:?}");
}

/// Sends a PROXY header and a CONNECT request from `from`; the CONNECT door's status line.
async fn connect_via(relay: &TestRelay, header: &[u8], token: &str) -> (String, TcpStream) {
    let mut s = TcpStream::connect(relay.connect).await.unwrap();
    s.write_all(header).await.unwrap();
    s.write_all(format!("CONNECT /console?token={token} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes()).await.unwrap();
    let head = relay_tests::relay_server::read_head(&mut s).await.unwrap_or_default();
    (head, s)
}

/// The viewer address of the live console of `instance`, as `sessions` lists it.
async fn listed_viewer(relay: &TestRelay, instance: &str) -> String {
    let listed = relay.ctl(relay::control::proto::Request::Sessions { instance: Some(instance.into()) }).await.unwrap();
    listed["sessions"][0]["viewer"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn proxy_protocol_names_the_viewer_only_from_trusted_balancers() {
    let hv = FakeVnc::start(Script::echo()).await;
    let trusted = TestRelay::start_with(|c| c.listen.proxy_protocol_from = vec![relay::cidr::Cidr::parse("127.0.0.0/8").unwrap()]).await;
    let token = trusted.token("vm-proxied", hv.addr()).await;
    let (head, mut v1) = connect_via(&trusted, b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 6081\r\n", &token).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    handshake(&mut v1, RFB38, None).await.unwrap();
    assert_eq!(listed_viewer(&trusted, "vm-proxied").await, "198.51.100.7:51234", "v1's viewer");
    drop(v1);
    trusted.no_live_consoles().await;
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend([0x21, 0x21, 0, 36]);
    v2.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42]);
    v2.extend([0u8; 15].into_iter().chain([1]));
    v2.extend([0x9c, 0x41, 0x17, 0xc1]);
    let (head, mut v2s) = connect_via(&trusted, &v2, &token).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    handshake(&mut v2s, RFB38, None).await.unwrap();
    assert_eq!(listed_viewer(&trusted, "vm-proxied").await, "[2001:db8::42]:40001", "v2's viewer");
    drop(v2s);
    // No header from a trusted balancer: its own address (a health check it makes).
    let (head, _) = connect_via(&trusted, b"", &token).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // A broken header: closed, no console.
    let (head, _) = connect_via(&trusted, b"PROXY TCP4 nonsense\r\n", &token).await;
    assert!(head.is_empty(), "{head}");

    // From anyone else, a PROXY header is no HTTP request.
    let untrusted = TestRelay::start().await;
    let token = untrusted.token("vm-spoof", hv.addr()).await;
    let (head, _) = connect_via(&untrusted, b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 6081\r\n", &token).await;
    assert!(head.starts_with("HTTP/1.1 400"), "a spoofed viewer address is refused: {head}");
}

/// Debian's HAProxy in front: its default `option httpchk` (`OPTIONS / HTTP/1.0`) marks
/// relay up, and with `send-proxy-v2` relay sees the viewer's own address.
#[tokio::test]
#[cfg_attr(relay_no_haproxy, ignore = "haproxy is not installed: cargo xtask deps")]
async fn haproxy_health_checks_relay_and_passes_the_viewer_with_proxy_v2() {
    relay_tests::env::haproxy();
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| c.listen.proxy_protocol_from = vec![relay::cidr::Cidr::parse("127.0.0.1").unwrap()]).await;
    let backend = format!(
        "backend relays\n    option httpchk\n    server relay1 {} send-proxy-v2 check port {} inter 200ms rise 1 fall 1\n",
        relay.connect,
        relay.ws.port()
    );
    let lb = relay_tests::servers::Haproxy::start(&backend).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let status = lb.server_status("relay1").await.unwrap();
        if status == "UP" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "HAProxy's health check did not mark relay up: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A viewer on another loopback address, so that its address and HAProxy's differ.
    let token = relay.token("vm-behind-lb", hv.addr()).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let mut s = socket.connect(lb.addr).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(format!("CONNECT /console?token={token} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes()).await.unwrap();
    let head = relay_tests::relay_server::read_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    handshake(&mut s, RFB38, None).await.unwrap();
    assert_eq!(listed_viewer(&relay, "vm-behind-lb").await, me.to_string(), "relay sees the viewer, not HAProxy");
}

/// One door on several addresses (IPv4 and IPv6, as `["0.0.0.0:6080", "[::]:6080"]`
/// would): every one takes consoles.
#[tokio::test]
async fn a_door_on_several_addresses_takes_consoles_on_each() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| {
        c.listen.connect = relay::config::Addrs(vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()]);
    })
    .await;
    let token = relay.token("vm-two-addresses", hv.addr()).await;
    let doors: Vec<SocketAddr> = relay.listening.iter().filter(|(k, _)| *k == relay::conn::Listener::Connect).map(|(_, a)| *a).collect();
    assert!(doors.len() == 2 && doors[1].is_ipv6(), "{doors:?}");
    for addr in doors {
        let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{addr}: {e}"));
        s.write_all(format!("CONNECT /console?token={token} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes()).await.unwrap();
        let head = relay_tests::relay_server::read_head(&mut s).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{addr}: {head}");
        handshake(&mut s, RFB38, None).await.unwrap();
    }
}
