//! SIGHUP reloads the front doors' certificate for new connections; connections
//! already open keep working. Its own test binary: it signals its own process.

use relay_tests::pki::{Ca, Role};
use relay_tests::relay_server::{TestRelay, scratch_dir};
use relay_tests::tls_client;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn sighup_swaps_the_certificate_without_dropping_connections() {
    // Our own handler first, so the signal can never take the default action (exit).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let dir = scratch_dir("reload");
    let issued = old_ca.issue_files(&dir, "relay", Role::Server, &["localhost"], false);
    let (cert, key) = (issued.cert.clone(), issued.key.clone());
    let relay = TestRelay::start_with(move |c| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
    })
    .await;
    let mut before = tls_client::connect(&old_ca.cert_pem(), relay.ws, "localhost").await.expect("old certificate");

    // A broken file on reload keeps the current certificate.
    std::fs::write(&issued.cert, "not a certificate").unwrap();
    std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    hup.recv().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(tls_client::connect(&old_ca.cert_pem(), relay.ws, "localhost").await.is_ok(), "kept after a failed reload");

    let (cert_pem, key_pem) = new_ca.issue(Role::Server, &["localhost"], false);
    std::fs::write(&issued.cert, cert_pem).unwrap();
    std::fs::write(&issued.key, key_pem).unwrap();
    std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    hup.recv().await;
    let mut swapped = false;
    for _ in 0..50 {
        if tls_client::connect(&new_ca.cert_pem(), relay.ws, "localhost").await.is_ok() {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(swapped, "new connections get the new certificate");
    assert!(tls_client::connect(&old_ca.cert_pem(), relay.ws, "localhost").await.is_err(), "and no longer the old one");

    // The connection made before both reloads still works.
    before.write_all(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    before.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 404 "), "{reply}");
}
