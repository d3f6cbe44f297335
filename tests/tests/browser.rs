//! Real noVNC in headless Chromium, loading its page from relay's web client and
//! showing a real QEMU console through a console token.

use relay::config::Backend;
use relay::control::proto::Request;
use relay_tests::browser::{assemble_web_root, open};
use relay_tests::env;
use relay_tests::hypervisor::{Qemu, VncAuth};
use relay_tests::relay_server::{TestRelay, scratch_dir};
use std::path::PathBuf;

async fn relay_serving(web: PathBuf) -> TestRelay {
    relay_on(web, Backend::Copy).await
}

async fn relay_on(web: PathBuf, backend: Backend) -> TestRelay {
    TestRelay::start_with(move |c| {
        c.listen.web = Some(web);
        c.relay.backend = backend;
        // On the back-end asked for from the first byte, not after a while on copy.
        c.relay.kernel_after_ms = 0;
        // A person types the password in the password tests; the driver is quick.
        c.limits.handshake_timeout_secs = 15;
    })
    .await
}

#[tokio::test]
#[cfg_attr(any(relay_no_qemu, relay_no_browser), ignore = "QEMU or Chromium is not installed: cargo xtask deps")]
async fn novnc_1_7_shows_the_qemu_console() {
    novnc_shows_the_qemu_console(Backend::Copy).await
}

/// The same through the io_uring back-end, which frames WebSocket consoles on its ring.
#[tokio::test]
#[cfg_attr(
    any(relay_no_qemu, relay_no_browser, relay_no_uring),
    ignore = "QEMU or Chromium is not installed (cargo xtask deps), or io_uring is disabled"
)]
async fn novnc_1_7_shows_the_qemu_console_through_io_uring() {
    env::uring();
    novnc_shows_the_qemu_console(Backend::Uring).await
}

async fn novnc_shows_the_qemu_console(backend: Backend) {
    env::qemu();
    env::browser();
    let qemu = Qemu::start(VncAuth::None).await.unwrap();
    let dir = scratch_dir("web");
    let relay = relay_on(assemble_web_root(&dir), backend).await;
    assert_eq!(relay.ctl(Request::Stats).await.unwrap()["relay"]["framed"], format!("{backend:?}").to_lowercase());
    let token = relay.token("vm-browser", qemu.addr()).await;
    let url = format!("http://{}/console.html?path=%3Ftoken%3D{token}", relay.ws);
    let shot = dir.join("console.png");
    let seen = open(&url, "connected", &[], Some(&shot)).await;
    assert!(seen.ok, "{:?}\n{}", seen.report, seen.stderr);
    assert_eq!((seen.report["width"].as_u64(), seen.report["height"].as_u64()), (Some(720), Some(400)));
    assert!(seen.report["colours"].as_u64().unwrap() >= 2, "the firmware screen has text on it");
    // Closing the browser ends the console; its audit totals land in the counters.
    let mut stats = serde_json::Value::Null;
    for _ in 0..50 {
        stats = relay.ctl(Request::Stats).await.unwrap();
        if stats["counters"]["sessions_ended"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(stats["counters"]["sessions_started"], 1);
    assert_eq!(stats["counters"]["sessions_ended"], 1, "closing the browser ended the console");
    // A clean close, or a reset when the browser exits with bytes unread (QEMU keeps
    // sending updates): either way the viewer's end, never the hypervisor's.
    let by_viewer = ["viewer_closed", "viewer_reset"].iter().map(|c| stats["ended"][c].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!(by_viewer, 1, "the browser's close is the viewer's end: {}", stats["ended"]);
    // noVNC asks for compressed encodings, so less than a raw frame, but a screenful.
    assert!(stats["counters"]["bytes_to_viewer"].as_u64().unwrap() > 1000, "{stats}");
}

#[tokio::test]
#[cfg_attr(
    any(relay_no_qemu, relay_no_browser, relay_no_debian_novnc),
    ignore = "QEMU, Chromium or Debian's novnc is not installed: cargo xtask deps"
)]
async fn debian_novnc_opens_the_url_token_create_hands_out() {
    env::qemu();
    env::browser();
    env::debian_novnc();
    let qemu = Qemu::start(VncAuth::None).await.unwrap();
    let relay = relay_serving("/usr/share/novnc".into()).await;
    let reply = relay.ctl(Request::TokenCreate(relay_tests::relay_server::new_token("vm-nova", qemu.addr()))).await.unwrap();
    let url = reply["urls"]["novnc"].as_str().unwrap().replace("localhost", "127.0.0.1");
    assert!(url.contains("/vnc_lite.html?path=%3Ftoken%3D"), "{url}");
    let seen = open(&url, "connected", &[], None).await;
    assert!(seen.ok, "{:?}\n{}", seen.report, seen.stderr);
}

#[tokio::test]
#[cfg_attr(any(relay_no_qemu, relay_no_browser), ignore = "QEMU or Chromium is not installed: cargo xtask deps")]
async fn console_password_prompt_right_and_wrong() {
    env::qemu();
    env::browser();
    // The hypervisor has its own VNC password; the viewer must give the console's.
    let qemu = Qemu::start(VncAuth::Password("hvpass".into())).await.unwrap();
    let dir = scratch_dir("web");
    let relay = relay_serving(assemble_web_root(&dir)).await;
    let mut req = relay_tests::relay_server::with_hypervisor_password(relay_tests::relay_server::new_token("vm-pw", qemu.addr()), "hvpass");
    req.password = Some(relay::auth::Secret("s3cret".into()));
    let token = relay.token_with(req).await;
    let url = format!("http://{}/console.html?path=%3Ftoken%3D{token}", relay.ws);

    let prompt = open(&url, "credentials", &[], None).await;
    assert!(prompt.ok, "noVNC asks for the password: {:?}", prompt.report);
    let wrong = open(&url, "securityfailure", &["--type-password", "nope"], None).await;
    assert!(wrong.ok, "{:?}", wrong.report);
    assert_eq!(wrong.report["reason"], "wrong console password");
    let hypervisors = open(&url, "securityfailure", &["--type-password", "hvpass"], None).await;
    assert!(hypervisors.ok, "the hypervisor's own password is not the console's: {:?}", hypervisors.report);
    let right = open(&url, "connected", &["--type-password", "s3cret"], None).await;
    assert!(right.ok, "{:?}\n{}", right.report, right.stderr);
}

#[tokio::test]
#[cfg_attr(any(relay_no_qemu, relay_no_browser), ignore = "QEMU or Chromium is not installed: cargo xtask deps")]
async fn novnc_over_wss_to_a_qemu_demanding_x509_client_certificates() {
    env::qemu();
    env::browser();
    use relay::auth::Scheme;
    use relay_tests::pki::{Ca, Role};
    let dir = scratch_dir("wss");
    // The hypervisor leg: QEMU with x509 credentials and verify-peer=on.
    let hv_ca = Ca::new("hypervisor CA");
    let hv_ca_file = hv_ca.write_cert(&dir.join("hv-ca.pem"));
    let client = hv_ca.issue_files(&dir, "relay-client", Role::Client, &["relay.example"], false);
    let creds = hv_ca.qemu_creds_dir(&dir.join("qemu"), &["127.0.0.1"], false);
    let qemu = Qemu::start(VncAuth::X509 { dir: creds, password: None }).await.unwrap();
    // The browser leg: wss with a certificate Chromium trusts by its key.
    let ca = Ca::new("browser test CA");
    let (cert, key, spki) = ca.issue_with_spki(Role::Server, &["localhost", "127.0.0.1"], false);
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let web = assemble_web_root(&dir.join("web"));
    let relay = TestRelay::start_with(move |c| {
        c.listen.web = Some(web);
        c.tls.cert = Some(cert_file);
        c.tls.key = Some(key_file);
        c.tls.ssl_only = true;
        c.hypervisor.auth_schemes = vec![Scheme::Vencrypt];
        c.hypervisor.vencrypt_ca_certs = Some(hv_ca_file);
        c.hypervisor.vencrypt_client_cert = Some(client.cert);
        c.hypervisor.vencrypt_client_key = Some(client.key);
    })
    .await;
    let token = relay.token("vm-wss", qemu.addr()).await;
    let url = format!("https://localhost:{}/console.html?path=%3Ftoken%3D{token}", relay.ws.port());
    let trust = format!("--ignore-certificate-errors-spki-list={spki}");
    let seen = open(&url, "connected", &["--chromium-arg", &trust], None).await;
    assert!(seen.ok, "{:?}\n{}", seen.report, seen.stderr);
    assert!(seen.report["websocket"].as_str().unwrap_or("").starts_with("wss://"), "{:?}", seen.report);
}
