//! The relay of established WebSocket consoles, on every back-end that frames them
//! (`copy` in userspace, `uring` on the ring): what a browser's noVNC relies on. The viewer
//! here is tungstenite, framing apart from relay's own code.

use futures_util::{SinkExt, StreamExt};
use relay::config::Backend;
use relay::control::proto::Request;
use relay::relay::lifecycle::Cause;
use relay_tests::env;
use relay_tests::fake_hypervisor::{After, FakeVnc, SERVER_INIT_LEN, Script, pattern, read_pattern};
use relay_tests::relay_server::{TestRelay, WsViewer};
use relay_tests::viewer::handshake;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const RFB38: &[u8; 12] = b"RFB 003.008\n";

macro_rules! websocket_relay {
    ($($backend:ident => $kind:expr, $skip:ident, $why:literal;)*) => {$(
        mod $backend {
            use super::*;
            websocket_relay!(@tests $kind, $skip, $why;
                many_mebibytes_each_way_byte_exact,
                the_viewers_close_reaches_the_hypervisor_as_a_fin,
                the_hypervisors_fin_reaches_the_viewer_after_its_data_as_a_close,
                pings_are_answered_between_data_frames,
                forced_disconnect_ends_the_console,
                a_stalled_viewer_bounds_what_is_in_flight_then_gets_every_byte,
                a_malformed_frame_ends_the_console,
                a_console_moved_mid_stream_keeps_every_byte_in_order,
                the_hypervisors_end_is_the_cause_even_when_the_viewer_then_resets,
            );
        }
    )*};
    (@tests $kind:expr, $skip:ident, $why:literal; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[cfg_attr($skip, ignore = $why)]
        async fn $name() {
            super::$name(start($kind).await).await
        }
    )*};
}

websocket_relay! {
    copy => Backend::Copy, relay_never, "";
    uring => Backend::Uring, relay_no_uring, "io_uring is disabled on this machine";
}

async fn start(backend: Backend) -> TestRelay {
    // The back-end itself from the first byte; the move from copy has its own test.
    start_with(backend, |c| c.relay.kernel_after_ms = 0).await
}

async fn start_with(backend: Backend, adjust: impl FnOnce(&mut relay::config::Config)) -> TestRelay {
    if backend == Backend::Uring {
        env::uring();
    }
    let relay = TestRelay::start_with(|c| {
        c.relay.backend = backend;
        c.limits.session_idle_timeout_secs = 0;
        adjust(c)
    })
    .await;
    let stats = relay.ctl(Request::Stats).await.unwrap();
    assert_eq!(stats["relay"]["framed"], format!("{backend:?}").to_lowercase(), "WebSocket consoles run on the back-end asked for");
    relay
}

async fn console(relay: &TestRelay, instance: &str, hv: &FakeVnc) -> WsViewer {
    let token = relay.token(instance, hv.addr()).await;
    let mut ws = relay.websocket(&format!("/?token={token}"), &[]).await.unwrap();
    handshake(&mut ws, RFB38, None).await.unwrap();
    ws
}

async fn many_mebibytes_each_way_byte_exact(relay: TestRelay) {
    let hv = FakeVnc::start(Script::echo()).await;
    let ws = console(&relay, "vm-ws-bulk", &hv).await;
    let (mut r, mut w) = tokio::io::split(ws);
    let total = 64 << 20;
    let writer = tokio::spawn(async move {
        let block = pattern(0, 251 * 1024);
        let mut sent = 0;
        while sent < total {
            let n = block.len().min(total - sent);
            w.write_all(&block[..n]).await.unwrap();
            sent += n;
        }
        w.flush().await.unwrap();
        w
    });
    assert_eq!(read_pattern(&mut r, total).await, total, "every byte echoed, in order");
    let _w = writer.await.unwrap();
    let sessions = relay.ctl(Request::Sessions { instance: Some("vm-ws-bulk".into()) }).await.unwrap();
    let live = &sessions["sessions"][0];
    assert!(live["bytes_to_hypervisor"].as_u64().unwrap() >= total as u64, "payload bytes counted: {live}");
}

/// A console bound for the ring starts on copy and moves while bytes stream both ways,
/// perhaps part-way through a frame: none lost, doubled or reordered across the move.
async fn a_console_moved_mid_stream_keeps_every_byte_in_order(default: TestRelay) {
    // Needs its own relay: the hand-over time is configuration.
    let framed = default.ctl(Request::Stats).await.unwrap()["relay"]["framed"].clone();
    drop(default);
    let backend = if framed == "uring" { Backend::Uring } else { Backend::Copy };
    let relay = start_with(backend, |c| c.relay.kernel_after_ms = 200).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let ws = console(&relay, "vm-ws-move", &hv).await;
    let (mut r, mut w) = tokio::io::split(ws);
    // 1 MiB every 10 ms: the stream outlasts the hand-over time several times over. It
    // starts past the opening look (100 ms), so the look at 200 ms finds the console busy;
    // the viewer reads nothing until after that, so both directions hold bytes read and not
    // yet written then.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let total = 96 << 20;
    let writer = tokio::spawn(async move {
        let block = pattern(0, total);
        for chunk in block.chunks(1 << 20) {
            w.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w.flush().await.unwrap();
        w
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(read_pattern(&mut r, total).await, total, "every byte echoed, in order");
    let _w = writer.await.unwrap();
    // The move comes at a quiet moment, which may be after the last echo.
    let moved = if backend == Backend::Copy { 0 } else { 1 };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let stats = relay.ctl(Request::Stats).await.unwrap();
        if stats["relay"]["hand_overs"] == moved || std::time::Instant::now() > deadline {
            assert_eq!(stats["relay"]["hand_overs"], moved, "consoles moved from copy: {stats}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn the_viewers_close_reaches_the_hypervisor_as_a_fin(relay: TestRelay) {
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-ws-close", hv.addr()).await;
    let mut ws = relay.websocket_frames(&format!("/?token={token}")).await;
    rfb_over_frames(&mut ws).await;
    ws.send(Message::binary(&b"bye"[..])).await.unwrap();
    ws.close(None).await.unwrap();
    let mut echoed = Vec::new();
    let mut closed = false;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match m {
            Message::Binary(b) => echoed.extend_from_slice(&b),
            Message::Close(_) => closed = true,
            _ => {}
        }
    }
    assert!(closed, "relay answered the Close");
    assert!(echoed.len() <= 3);
    assert_eq!(hv.ends().await, vec!["eof".to_string()], "the hypervisor saw a clean end");
    assert_eq!(hv.shared().received.load(SeqCst), 3, "data before the Close arrived");
}

async fn the_hypervisors_fin_reaches_the_viewer_after_its_data_as_a_close(relay: TestRelay) {
    let hv = FakeVnc::start(Script::after(After::SendThenFin(3 << 20))).await;
    let token = relay.token("vm-ws-hvfin", hv.addr()).await;
    let mut ws = relay.websocket_frames(&format!("/?token={token}")).await;
    let mut got = rfb_over_frames(&mut ws).await;
    let expected = pattern(0, 3 << 20);
    let last = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("in time") {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            other => break other,
        }
    };
    assert!(got == expected, "all {} bytes, in order, before the end ({} came)", expected.len(), got.len());
    assert!(matches!(last, Some(Ok(Message::Close(_)))), "then a Close frame: {last:?}");
}

/// The hypervisor went first: a browser that resets its connection once it has the
/// Close does not make the end the viewer's.
async fn the_hypervisors_end_is_the_cause_even_when_the_viewer_then_resets(relay: TestRelay) {
    let hv = FakeVnc::start(Script::after(After::SendThenFin(1 << 20))).await;
    let token = relay.token("vm-ws-hvend", hv.addr()).await;
    let mut ws = relay.websocket_frames(&format!("/?token={token}")).await;
    rfb_over_frames(&mut ws).await;
    let last = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("in time") {
            Some(Ok(Message::Binary(_))) => {}
            other => break other,
        }
    };
    assert!(matches!(last, Some(Ok(Message::Close(_)))), "a Close frame: {last:?}");
    match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.set_zero_linger().unwrap(),
        _ => unreachable!("ws://"),
    }
    drop(ws);
    let ended = relay.ended(1).await.ended;
    assert_eq!(ended[&Cause::HypervisorClosed], 1, "{ended:?}");
    assert_eq!(ended[&Cause::ViewerReset], 0, "{ended:?}");
}

async fn pings_are_answered_between_data_frames(relay: TestRelay) {
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-ws-ping", hv.addr()).await;
    let mut ws = relay.websocket_frames(&format!("/?token={token}")).await;
    rfb_over_frames(&mut ws).await;
    let mut pongs = Vec::new();
    let mut echoed = 0;
    for i in 0..20u8 {
        ws.send(Message::binary(vec![i; 1000])).await.unwrap();
        ws.send(Message::Ping(vec![i; 4].into())).await.unwrap();
    }
    // Pings that arrive together may get one pong, for the latest (RFC 6455 §5.5.3).
    while pongs.last() != Some(&19) || echoed < 20_000 {
        let next = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        let next = next.unwrap_or_else(|_| panic!("in time: pongs {pongs:?}, {echoed} bytes"));
        match next.unwrap().unwrap() {
            Message::Binary(b) => echoed += b.len(),
            Message::Pong(p) => pongs.push(p[0]),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pongs.windows(2).all(|w| w[0] < w[1]), "pongs in order: {pongs:?}");
    assert_eq!(echoed, 20_000);
}

async fn forced_disconnect_ends_the_console(relay: TestRelay) {
    let hv = FakeVnc::start(Script::echo()).await;
    let mut ws = console(&relay, "vm-ws-kick", &hv).await;
    ws.write_all(b"before").await.unwrap();
    ws.flush().await.unwrap();
    let mut echo = [0u8; 6];
    ws.read_exact(&mut echo).await.unwrap();
    let reply = relay.ctl(Request::InstanceReset { instance: "vm-ws-kick".into(), revoke: true }).await.unwrap();
    assert_eq!(reply["disconnected"], 1);
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.read_to_end(&mut rest)).await.expect("the viewer sees the end");
    assert!(end.is_ok() && rest.is_empty(), "{end:?} {rest:?}");
    assert_eq!(hv.ends().await, vec!["eof".to_string()]);
    relay.no_live_consoles().await;
}

async fn a_stalled_viewer_bounds_what_is_in_flight_then_gets_every_byte(relay: TestRelay) {
    let total = 128 << 20;
    let hv = FakeVnc::start(Script::after(After::Flood(total))).await;
    let mut ws = console(&relay, "vm-ws-stall", &hv).await;
    let last = hv.sent_when_blocked().await;
    // Socket buffers on both legs plus one receive chunk per direction.
    assert!(last < 48 << 20, "{} MiB in flight to a stalled viewer", last >> 20);
    eprintln!("stalled WebSocket viewer: the hypervisor blocked after {} KiB", last >> 10);
    assert_eq!(read_pattern(&mut ws, total).await, total, "resumed: every byte, in order");
}

async fn a_malformed_frame_ends_the_console(relay: TestRelay) {
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-ws-bad", hv.addr()).await;
    let mut ws = relay.websocket_frames(&format!("/?token={token}")).await;
    rfb_over_frames(&mut ws).await;
    ws.send(Message::text("not RFB")).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("the connection ended without a Close frame: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(ended.expect("a text frame ends the console"), Some(1002), "with Close 1002 (protocol error)");
    assert_eq!(hv.ends().await.len(), 1, "and its hypervisor connection");
    relay.no_live_consoles().await;
}

/// RFB None up to ServerInit, at frame level; returns bytes that came after ServerInit.
async fn rfb_over_frames(ws: &mut relay_tests::relay_server::WsFrames) -> Vec<u8> {
    read_frames(ws, 12).await;
    ws.send(Message::binary(&RFB38[..])).await.unwrap();
    read_frames(ws, 2).await;
    ws.send(Message::binary(vec![1u8])).await.unwrap();
    read_frames(ws, 4).await;
    ws.send(Message::binary(vec![1u8])).await.unwrap();
    read_frames(ws, SERVER_INIT_LEN).await
}

/// Reads `n` bytes of binary frames; returns what came beyond them.
async fn read_frames(ws: &mut relay_tests::relay_server::WsFrames, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("in time").unwrap().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    got.split_off(n)
}

/// A quiet console behind HAProxy with `timeout tunnel 30s` lives past 60 s on relay's
/// WebSocket pings; the same console without them is cut by HAProxy (the control).
async fn heartbeats_keep_a_quiet_console_open_behind_haproxy(backend: Backend) {
    env::haproxy();
    let hv = FakeVnc::start(Script::echo()).await;
    let beating = start_with(backend, |c| c.keepalive.websocket_ping_secs = 10).await;
    let silent = start_with(backend, |c| c.keepalive.websocket_ping_secs = 0).await;
    let timeouts = "mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n    timeout tunnel 30s";
    let behind = |relay: &TestRelay| format!("backend relays\n    server relay1 {}\n", relay.ws);
    let lb_beating = relay_tests::servers::Haproxy::start_with(timeouts, &behind(&beating)).await.unwrap();
    let lb_silent = relay_tests::servers::Haproxy::start_with(timeouts, &behind(&silent)).await.unwrap();
    let mut viewers = Vec::new();
    for (relay, lb, instance) in [(&beating, &lb_beating, "vm-beating"), (&silent, &lb_silent, "vm-silent")] {
        let token = relay.token(instance, hv.addr()).await;
        let mut ws = relay_tests::relay_server::websocket_at(lb.addr, &format!("/?token={token}"), &[]).await.unwrap();
        handshake(&mut ws, RFB38, None).await.unwrap();
        viewers.push(ws);
    }
    let [mut a, mut b] = <[WsViewer; 2]>::try_from(viewers).ok().unwrap();
    // Nobody sends a byte of RFB for 65 s; the viewers read (answering pings, as noVNC does).
    let quiet = Duration::from_secs(65);
    let (mut buf_a, mut buf_b) = ([0u8; 64], [0u8; 64]);
    let (read_a, read_b) = tokio::join!(tokio::time::timeout(quiet, a.read(&mut buf_a)), tokio::time::timeout(quiet, b.read(&mut buf_b)));
    assert!(matches!(read_b, Ok(Ok(0) | Err(_))), "without heartbeats HAProxy ends the quiet console at 30 s: {read_b:?}");
    assert!(read_a.is_err(), "with heartbeats the quiet console stays open, carrying no data: {read_a:?}");
    a.write_all(b"still here").await.unwrap();
    a.flush().await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), a.read_exact(&mut back)).await.expect("the echo").unwrap();
    assert_eq!(&back, b"still here", "the console works after 65 quiet seconds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_haproxy, ignore = "haproxy is not installed: cargo xtask deps")]
async fn heartbeats_keep_a_quiet_console_open_behind_haproxy_on_copy() {
    heartbeats_keep_a_quiet_console_open_behind_haproxy(Backend::Copy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(any(relay_no_haproxy, relay_no_uring), ignore = "haproxy is not installed, or io_uring is disabled on this machine")]
async fn heartbeats_keep_a_quiet_console_open_behind_haproxy_on_uring() {
    heartbeats_keep_a_quiet_console_open_behind_haproxy(Backend::Uring).await
}
