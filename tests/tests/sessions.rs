//! Live consoles on a scripted hypervisor: every byte both ways, half-close, resets,
//! internal_access_path, and forced disconnects across both doors.

use relay::control::proto::Request;
use relay_tests::fake_hypervisor::{After, FakeVnc, Script, Security};
use relay_tests::relay_server::{TestRelay, new_token};
use relay_tests::viewer::{ViewerError, handshake};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const RFB38: &[u8; 12] = b"RFB 003.008\n";

/// Sends `data` and reads it back through the echoing hypervisor, concurrently.
async fn echo_roundtrip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, data: &[u8]) {
    let (mut r, mut w) = tokio::io::split(s);
    let write = async {
        for chunk in data.chunks(7919) {
            w.write_all(chunk).await.unwrap();
            w.flush().await.unwrap();
        }
    };
    let read = async {
        let mut back = vec![0u8; data.len()];
        r.read_exact(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(write, read) }).await.expect("echo in time");
    assert!(back == data, "every byte, in order");
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 256) as u8).collect()
}

#[tokio::test]
async fn every_byte_both_ways_through_both_doors() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let token = relay.token("vm-echo", hv.addr()).await;
    let data = pattern(8 << 20);

    let mut raw = relay.connect_door(&token).await.unwrap();
    assert_eq!(handshake(&mut raw, RFB38, None).await.unwrap().name, "fake");
    echo_roundtrip(&mut raw, &data).await;

    let mut ws = relay.websocket(&format!("/?token={token}"), &[]).await.unwrap();
    assert_eq!(handshake(&mut ws, RFB38, None).await.unwrap().name, "fake");
    echo_roundtrip(&mut ws, &data).await;

    let sessions = relay.ctl(Request::Sessions { instance: Some("vm-echo".into()) }).await.unwrap();
    let listed = sessions["sessions"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    for s in listed {
        assert!(s["bytes_to_hypervisor"].as_u64().unwrap() >= data.len() as u64);
        assert!(s["bytes_to_viewer"].as_u64().unwrap() >= data.len() as u64);
    }
}

#[tokio::test]
async fn viewer_fin_reaches_the_hypervisor_and_the_console_ends_cleanly() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let token = relay.token("vm-fin", hv.addr()).await;
    let mut raw = relay.connect_door(&token).await.unwrap();
    handshake(&mut raw, RFB38, None).await.unwrap();
    raw.write_all(b"last words").await.unwrap();
    raw.shutdown().await.unwrap();
    // The echo server sees EOF only if relay passed the FIN on; it then echoes and closes.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(rest, b"last words");
}

// Multi-threaded so that a relay spinning on a finished direction fails this test by
// its timeout instead of starving the test itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_console_ends_after_the_half_close_timeout() {
    let hv = FakeVnc::start(Script::after(After::Hold)).await;
    let relay = TestRelay::start_with(|c| c.limits.half_close_timeout_secs = 1).await;
    let token = relay.token("vm-half", hv.addr()).await;
    let mut raw = relay.connect_door(&token).await.unwrap();
    handshake(&mut raw, RFB38, None).await.unwrap();
    raw.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "relay ends a console the hypervisor keeps half-open");
    assert!(relay.ctl(Request::Sessions { instance: None }).await.unwrap()["sessions"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn idle_consoles_end_when_configured() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| c.limits.session_idle_timeout_secs = 1).await;
    let token = relay.token("vm-idle", hv.addr()).await;
    let mut raw = relay.connect_door(&token).await.unwrap();
    handshake(&mut raw, RFB38, None).await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "an idle console is closed");
}

#[tokio::test]
async fn a_hypervisor_reset_mid_stream_resets_the_viewer_after_the_data() {
    let hv = FakeVnc::start(Script::after(After::ResetAfter(100_000))).await;
    let relay = TestRelay::start().await;
    let token = relay.token("vm-rst", hv.addr()).await;
    let mut raw = relay.connect_door(&token).await.unwrap();
    handshake(&mut raw, RFB38, None).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf)).await.expect("no hang") {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e.kind()),
        }
    };
    // Bytes before the reset may or may not all arrive (a reset discards what is
    // queued), but what arrives is in order, and the end is a reset, not a clean EOF.
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "in order");
    assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset), "got {} bytes then {end:?}", got.len());
}

#[tokio::test]
async fn internal_access_path_connect_with_greeting_in_the_same_segment() {
    let hv = FakeVnc::start(Script { connect_status: Some(200), ..Script::echo() }).await;
    let relay = TestRelay::start().await;
    let mut req = new_token("vm-xen", hv.addr());
    req.target.internal_access_path = Some("/console?ref=OpaqueRef:1234".into());
    let token = relay.token_with(req).await;
    let mut raw = relay.connect_door(&token).await.unwrap();
    handshake(&mut raw, RFB38, None).await.expect("the greeting behind the CONNECT reply was kept");
    echo_roundtrip(&mut raw, b"after the access path").await;

    let refused = FakeVnc::start(Script { connect_status: Some(404), ..Script::echo() }).await;
    let mut req = new_token("vm-xen2", refused.addr());
    req.target.internal_access_path = Some("/console?ref=gone".into());
    let token = relay.token_with(req).await;
    let err = relay.connect_door(&token).await.unwrap_err();
    assert!(err.starts_with("HTTP/1.1 502 "), "{err}");
}

#[tokio::test]
async fn hypervisor_refusal_and_down_reach_a_websocket_viewer_as_rfb_reasons() {
    let hv = FakeVnc::start(Script { security: Security::Refuse("too many clients".into()), ..Script::echo() }).await;
    let relay = TestRelay::start().await;
    let token = relay.token("vm-ref", hv.addr()).await;
    let mut ws = relay.websocket(&format!("/?token={token}"), &[]).await.unwrap();
    match handshake(&mut ws, RFB38, None).await {
        Err(ViewerError::Refused(why)) => assert!(why.starts_with("console unavailable"), "{why}"),
        other => panic!("{other:?}"),
    }
    let token = relay.token("vm-down", "127.0.0.1:9".parse().unwrap()).await;
    let mut ws = relay.websocket(&format!("/?token={token}"), &[]).await.unwrap();
    assert!(matches!(handshake(&mut ws, RFB38, None).await, Err(ViewerError::Refused(_))));
}

#[tokio::test]
async fn instance_reset_ends_that_instances_consoles_on_both_doors_only() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start().await;
    let x = relay.token("vm-x", hv.addr()).await;
    let y = relay.token("vm-y", hv.addr()).await;
    let mut x_raw = relay.connect_door(&x).await.unwrap();
    handshake(&mut x_raw, RFB38, None).await.unwrap();
    let mut x_ws = relay.websocket(&format!("/?token={x}"), &[]).await.unwrap();
    handshake(&mut x_ws, RFB38, None).await.unwrap();
    let mut y_raw = relay.connect_door(&y).await.unwrap();
    handshake(&mut y_raw, RFB38, None).await.unwrap();

    let reply = relay.ctl(Request::InstanceReset { instance: "vm-x".into(), revoke: true }).await.unwrap();
    assert_eq!(reply["disconnected"], 2);
    assert_eq!(reply["revoked"], 1);
    for (name, ended) in [
        ("connect", tokio::time::timeout(Duration::from_secs(5), x_raw.read_to_end(&mut Vec::new())).await.is_ok()),
        ("websocket", tokio::time::timeout(Duration::from_secs(5), x_ws.read_to_end(&mut Vec::new())).await.is_ok()),
    ] {
        assert!(ended, "{name} console of vm-x ended");
    }
    echo_roundtrip(&mut y_raw, b"still here").await;
    assert!(relay.connect_door(&x).await.unwrap_err().contains("unknown console token"), "revoked");
    let left = relay.ctl(Request::Sessions { instance: None }).await.unwrap();
    assert_eq!(left["sessions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_live_console_keeps_its_token_from_lapsing() {
    let hv = FakeVnc::start(Script::echo()).await;
    let relay = TestRelay::start_with(|c| {
        c.tokens.touch_interval_secs = 1;
        c.tokens.sweep_interval_secs = 1;
    })
    .await;
    let mut in_use = new_token("vm-touch", hv.addr());
    in_use.idle_timeout = Some(2);
    let in_use = relay.token_with(in_use).await;
    let mut unused = new_token("vm-touch", hv.addr());
    unused.idle_timeout = Some(2);
    let unused = relay.token_with(unused).await;

    let mut raw = relay.connect_door(&in_use).await.unwrap();
    handshake(&mut raw, RFB38, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let check = |token: String| relay.ctl(Request::TokenCheck { token });
    assert_eq!(check(in_use.clone()).await.unwrap()["valid"], true, "touched while its console is live");
    assert_eq!(check(unused).await.unwrap()["valid"], false, "an unused token lapses");
    echo_roundtrip(&mut raw, b"still relaying").await;
}

#[tokio::test]
async fn garbage_from_the_hypervisor_or_the_viewer_ends_cleanly() {
    // A "hypervisor" that is not a VNC server at all.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let not_vnc = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n").await;
        }
    });
    let relay = TestRelay::start().await;
    let token = relay.token("vm-garbage", not_vnc).await;
    let mut raw = relay.connect_door(&token).await.unwrap();
    match handshake(&mut raw, RFB38, None).await {
        Err(ViewerError::Refused(why)) => assert!(why.starts_with("console unavailable"), "{why}"),
        other => panic!("{other:?}"),
    }

    // A viewer that answers relay's greeting with something that is not RFB.
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-bad-viewer", hv.addr()).await;
    let mut raw = relay.connect_door(&token).await.unwrap();
    let mut greeting = [0u8; 12];
    raw.read_exact(&mut greeting).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok() && rest.is_empty(), "closed without a console: {rest:?}");
    let stats = relay.ctl(Request::Stats).await.unwrap();
    assert_eq!(stats["counters"]["sessions_started"], 0);
    assert_eq!(stats["counters"]["hypervisor_failures"], 1);
}
