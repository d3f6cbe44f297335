//! Consoles of a real QEMU VNC server through both doors: security None and a VNC
//! password on the hypervisor side, a full framebuffer read by a raw RFB viewer.

use relay::relay::lifecycle::Cause;
use relay_tests::env;
use relay_tests::hypervisor::{Qemu, VncAuth};
use relay_tests::relay_server::{TestRelay, new_token, with_hypervisor_password};
use relay_tests::viewer::{busy_for, distinct_colours, framebuffer, handshake, resized_framebuffer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn connect_door_full_framebuffer_from_qemu() {
    env::qemu();
    let qemu = Qemu::start(VncAuth::None).await.unwrap();
    let relay = TestRelay::start().await;
    let token = relay.token("vm-q1", qemu.addr()).await;
    let mut viewer = relay.connect_door(&token).await.expect("200 from the CONNECT door");
    let init = handshake(&mut viewer, b"RFB 003.008\n", None).await.expect("RFB through relay");
    assert!(init.width >= 640 && init.height >= 400, "{init:?}");
    let pixels = framebuffer(&mut viewer, &init).await.expect("a full framebuffer update");
    assert!(pixels.len() >= 640 * 400 * 4);
    assert!(distinct_colours(&pixels) >= 2, "the firmware screen is not blank");
}

#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn websocket_door_with_hypervisor_password_and_rfb_33_viewer() {
    env::qemu();
    let qemu = Qemu::start(VncAuth::Password("hvpw".into())).await.unwrap();
    let relay = TestRelay::start().await;
    let token = relay.token_with(with_hypervisor_password(new_token("vm-q2", qemu.addr()), "hvpw")).await;
    let mut viewer = relay.websocket(&format!("/?token={token}"), &[]).await.expect("upgrade");
    // An RFB 3.3 viewer: relay speaks 3.3 to it and 3.8 with VNC auth to QEMU.
    let init = handshake(&mut viewer, b"RFB 003.003\n", None).await.expect("RFB through relay");
    let pixels = framebuffer(&mut viewer, &init).await.unwrap();
    assert!(distinct_colours(&pixels) >= 2);
}

#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn wrong_hypervisor_password_reaches_the_viewer_as_a_reason() {
    env::qemu();
    let qemu = Qemu::start(VncAuth::Password("hvpw".into())).await.unwrap();
    let relay = TestRelay::start().await;
    let token = relay.token_with(with_hypervisor_password(new_token("vm-q3", qemu.addr()), "wrong")).await;
    let mut viewer = relay.connect_door(&token).await.unwrap();
    let err = handshake(&mut viewer, b"RFB 003.008\n", None).await.expect_err("refused");
    assert!(err.to_string().contains("console unavailable"), "{err}");
    let stats = relay.ctl(relay::control::proto::Request::Stats).await.unwrap();
    assert_eq!(stats["counters"]["hypervisor_failures"], 1);
    assert_eq!(stats["counters"]["sessions_started"], 0);
}

/// relay's default configuration moves a busy raw console to the kernel after its first
/// second (sockmap where relay may load its program): QEMU's screen still arrives whole
/// after the move, and the move is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn connect_door_console_keeps_working_after_moving_to_the_kernel() {
    env::qemu();
    let qemu = Qemu::start(VncAuth::None).await.unwrap();
    let relay = TestRelay::start().await;
    let (mut viewer, mut size, before) = console_with_a_screen(&relay, &qemu, "vm-q4").await;
    // Whole screens for past the hand-over time (over 1 MB/s, the default bar for a move);
    // then, with nothing in flight, the console moves.
    let shown = busy_for(&mut viewer, (&mut size.0, &mut size.1), std::time::Duration::from_millis(1500)).await.expect("screens on copy");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = resized_framebuffer(&mut viewer, (&mut size.0, &mut size.1)).await.expect("a full framebuffer update after the move");
    assert_eq!(after.len(), before.len());
    assert!(distinct_colours(&after) >= 2, "the firmware screen is not blank");
    let stats = relay.ctl(relay::control::proto::Request::Stats).await.unwrap();
    let moved = if stats["relay"]["raw"] == "copy" { 0 } else { 1 };
    assert_eq!(stats["relay"]["hand_overs"], moved, "{shown} bytes of screens in 1.5 s: {stats}");
}

/// A typing console (key events, a few hundred bytes a second) on relay's default `auto`
/// moves to sockmap, where relay may load its program, at its second real look, though its
/// opening screen alone is over the busy bar: QEMU still
/// takes the keys and sends a whole screen after the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn a_typing_console_moves_to_sockmap_and_keeps_its_screen() {
    env::qemu();
    let qemu = Qemu::start(VncAuth::None).await.unwrap();
    // relay's defaults: the opening look at 0.5 s, the busy one at 1 s (1 MB/s since the
    // opening look), the quiet one at 2 s. The opening screen in raw pixels is 1.15 MB,
    // which would make the console busy if it counted. Wait for the firmware to draw it
    // first, directly: a viewer asks again every 0.2 s while the screen is blank, and
    // those full screens, past the opening look, would rightly make the console busy.
    let mut direct = tokio::net::TcpStream::connect(qemu.addr()).await.unwrap();
    let init = handshake(&mut direct, b"RFB 003.008\n", None).await.expect("RFB from QEMU");
    let (mut width, mut height) = (init.width, init.height);
    resized_framebuffer(&mut direct, (&mut width, &mut height)).await.expect("a drawn screen");
    drop(direct);
    let relay = TestRelay::start().await;
    let (mut viewer, mut size, before) = console_with_a_screen(&relay, &qemu, "vm-q6").await;
    // Shift pressed and released every 40 ms for 2.4 s (KeyEvent: type 4, down, padding,
    // keysym): past the quiet look.
    for _ in 0..60 {
        for down in [1u8, 0] {
            viewer.write_all(&[4, down, 0, 0, 0, 0, 0xff, 0xe1]).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
    let stats = async || relay.ctl(relay::control::proto::Request::Stats).await.unwrap();
    let moved = if stats().await["relay"]["raw_quiet"] == "sockmap" { 1 } else { 0 };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while stats().await["relay"]["hand_overs"] != moved && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let stats = stats().await;
    assert_eq!(stats["relay"]["hand_overs"], moved, "the typing console moved: {stats}");
    assert_eq!(stats["relay"]["sockmap_sockets"], 2 * moved, "to sockmap: {stats}");
    let after = resized_framebuffer(&mut viewer, (&mut size.0, &mut size.1)).await.expect("a full framebuffer update after the move");
    assert_eq!(after.len(), before.len());
    assert!(distinct_colours(&after) >= 2, "the firmware screen is not blank");
}

/// QEMU killed under live consoles, one per door, on relay's default configuration (the
/// CONNECT console past its move to the kernel): each console's end is the
/// hypervisor's, even though each viewer then resets its connection as a browser does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn a_killed_hypervisor_is_the_end_on_both_doors() {
    env::qemu();
    let mut qemu = Qemu::start(VncAuth::None).await.unwrap();
    let relay = TestRelay::start().await;
    let token = relay.token("vm-q5", qemu.addr()).await;
    let mut raw = relay.connect_door(&token).await.expect("200 from the CONNECT door");
    let init = handshake(&mut raw, b"RFB 003.008\n", None).await.expect("RFB through relay");
    let mut ws = relay.websocket(&format!("/?token={token}"), &[]).await.expect("upgrade");
    handshake(&mut ws, b"RFB 003.008\n", None).await.expect("RFB through relay");
    // The raw console busy past the hand-over time, so that it moves to the kernel.
    let mut size = (init.width, init.height);
    resized_framebuffer(&mut raw, (&mut size.0, &mut size.1)).await.expect("a screen");
    busy_for(&mut raw, (&mut size.0, &mut size.1), std::time::Duration::from_millis(1500)).await.expect("screens on copy");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let stats = relay.ctl(relay::control::proto::Request::Stats).await.unwrap();
    let moved = if stats["relay"]["raw"] == "copy" { 0 } else { 1 };
    assert_eq!(stats["relay"]["hand_overs"], moved, "the raw console moved before the kill: {stats}");
    qemu.kill();
    let mut sink = vec![0u8; 1 << 16];
    // The viewers see the end (a clean one, or a reset passed on), then reset their side.
    while matches!(tokio::time::timeout(std::time::Duration::from_secs(5), raw.read(&mut sink)).await.expect("the end reaches the viewer"), Ok(n) if n > 0)
    {
    }
    raw.set_zero_linger().unwrap();
    drop(raw);
    while matches!(tokio::time::timeout(std::time::Duration::from_secs(5), ws.read(&mut sink)).await.expect("the end reaches the viewer"), Ok(n) if n > 0)
    {
    }
    ws.reset();
    let ended = relay.ended(2).await.ended;
    let by_hypervisor = ended[&Cause::HypervisorClosed] + ended[&Cause::HypervisorReset];
    assert_eq!(by_hypervisor, 2, "both consoles ended by the hypervisor: {ended:?}");
}

/// A CONNECT-door console of `qemu` through `relay`, past RFB, and its first drawn screen
/// (raw pixels, in the size QEMU last announced).
async fn console_with_a_screen(relay: &TestRelay, qemu: &Qemu, instance: &str) -> (tokio::net::TcpStream, (u16, u16), Vec<u8>) {
    let token = relay.token(instance, qemu.addr()).await;
    let mut viewer = relay.connect_door(&token).await.expect("200 from the CONNECT door");
    let init = handshake(&mut viewer, b"RFB 003.008\n", None).await.expect("RFB through relay");
    let mut size = (init.width, init.height);
    let screen = resized_framebuffer(&mut viewer, (&mut size.0, &mut size.1)).await.expect("a full framebuffer update on copy");
    (viewer, size, screen)
}
