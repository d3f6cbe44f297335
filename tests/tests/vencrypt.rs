//! VeNCrypt towards a real QEMU VNC server with x509 credentials and verify-peer=on:
//! relay presents its client certificate, verifies QEMU's against the CA and the
//! token's host, then authenticates inside TLS. Bad certificates are refused.

use relay::auth::Scheme;
use relay::config::Config;
use relay::control::proto::Request;
use relay::relay::lifecycle::Cause;
use relay_tests::env;
use relay_tests::hypervisor::{Qemu, VncAuth};
use relay_tests::pki::{Ca, Issued, Role};
use relay_tests::relay_server::{TestRelay, new_token, scratch_dir, with_hypervisor_password};
use relay_tests::viewer::{ViewerError, distinct_colours, framebuffer, handshake};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Pki {
    ca: Ca,
    dir: PathBuf,
    client: Issued,
}

fn pki() -> Pki {
    let ca = Ca::new("hypervisor CA");
    let dir = scratch_dir("vencrypt");
    ca.write_cert(&dir.join("ca.pem"));
    let client = ca.issue_files(&dir, "relay-client", Role::Client, &["relay.example"], false);
    Pki { ca, dir, client }
}

/// relay configured for VeNCrypt: trusts `ca_file`, presents `client` if given.
fn vencrypt(c: &mut Config, ca_file: &Path, client: Option<&Issued>) {
    c.hypervisor.auth_schemes = vec![Scheme::Vencrypt];
    c.hypervisor.vencrypt_ca_certs = Some(ca_file.to_path_buf());
    c.hypervisor.vencrypt_client_cert = client.map(|i| i.cert.clone());
    c.hypervisor.vencrypt_client_key = client.map(|i| i.key.clone());
}

/// QEMU with x509 credentials issued by `ca` for `names`.
async fn qemu(ca: &Ca, dir: &Path, names: &[&str], expired: bool, password: Option<&str>) -> Qemu {
    let creds = ca.qemu_creds_dir(&dir.join(format!("qemu-{}", names.join("-"))), names, expired);
    Qemu::start(VncAuth::X509 { dir: creds, password: password.map(str::to_string) }).await.unwrap()
}

async fn refused(relay: &TestRelay, token: &str) -> String {
    let mut viewer = relay.connect_door(token).await.unwrap();
    match handshake(&mut viewer, b"RFB 003.008\n", None).await {
        Err(ViewerError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn x509_none_and_x509_vnc_show_the_console() {
    env::qemu();
    let p = pki();
    let (ca_file, client) = (p.dir.join("ca.pem"), p.client.clone());
    let relay = TestRelay::start_with(move |c| vencrypt(c, &ca_file, Some(&client))).await;

    let plain = qemu(&p.ca, &p.dir, &["127.0.0.1"], false, None).await;
    let token = relay.token("vm-x509", plain.addr()).await;
    let mut viewer = relay.connect_door(&token).await.unwrap();
    let init = handshake(&mut viewer, b"RFB 003.008\n", None).await.expect("X509None through relay");
    assert!(distinct_colours(&framebuffer(&mut viewer, &init).await.unwrap()) >= 2);

    let with_pw = qemu(&p.ca, &p.dir, &["127.0.0.1"], false, Some("hvpw")).await;
    let token = relay.token_with(with_hypervisor_password(new_token("vm-x509vnc", with_pw.addr()), "hvpw")).await;
    let mut viewer = relay.websocket(&format!("/?token={token}"), &[]).await.unwrap();
    let init = handshake(&mut viewer, b"RFB 003.008\n", None).await.expect("X509Vnc through relay");
    assert!(distinct_colours(&framebuffer(&mut viewer, &init).await.unwrap()) >= 2);

    let token = relay.token_with(with_hypervisor_password(new_token("vm-x509bad", with_pw.addr()), "nope")).await;
    assert!(refused(&relay, &token).await.starts_with("console unavailable"), "wrong password inside TLS");
}

#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn bad_certificates_are_refused() {
    env::qemu();
    let p = pki();
    let stranger = Ca::new("some other CA");
    let (ca_file, client) = (p.dir.join("ca.pem"), p.client.clone());
    let relay = TestRelay::start_with(move |c| vencrypt(c, &ca_file, Some(&client))).await;
    let cases = [
        ("unknown-CA", qemu(&stranger, &p.dir, &["127.0.0.1"], false, None).await),
        ("wrong-host-name", qemu(&p.ca, &p.dir, &["hv.example"], false, None).await),
    ];
    for (what, hv) in &cases {
        let token = relay.token(what, hv.addr()).await;
        let why = refused(&relay, &token).await;
        assert!(why.starts_with("console unavailable"), "{what}: {why}");
    }
    // QEMU will not start with an expired certificate; a minimal VeNCrypt server will.
    let (cert, key) = p.ca.issue(Role::Server, &["127.0.0.1"], true);
    let expired = expired_vencrypt_server(cert, key).await;
    let token = relay.token("expired-certificate", expired).await;
    assert!(refused(&relay, &token).await.starts_with("console unavailable"), "expired certificate");
    let stats = relay.ctl(Request::Stats).await.unwrap();
    assert_eq!(stats["counters"]["hypervisor_failures"], 3);
    assert_eq!(stats["counters"]["sessions_started"], 0);
}

#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn missing_client_certificate_anonymous_tls_and_no_common_scheme_are_refused() {
    env::qemu();
    let p = pki();
    let ca_file = p.dir.join("ca.pem");
    let no_client = {
        let ca_file = ca_file.clone();
        TestRelay::start_with(move |c| vencrypt(c, &ca_file, None)).await
    };
    let hv = qemu(&p.ca, &p.dir, &["127.0.0.1"], false, None).await;
    let token = no_client.token("vm-nocert", hv.addr()).await;
    assert!(refused(&no_client, &token).await.starts_with("console unavailable"), "QEMU demands a client certificate");

    let anon = Qemu::start(VncAuth::AnonTls).await.unwrap();
    let token = no_client.token("vm-anon", anon.addr()).await;
    assert!(refused(&no_client, &token).await.starts_with("console unavailable"), "anonymous TLS is not a downgrade path");

    // A relay that may only use none/vnc meets a hypervisor that only offers VeNCrypt.
    let plain_relay = TestRelay::start().await;
    let token = plain_relay.token("vm-nocommon", hv.addr()).await;
    assert!(refused(&plain_relay, &token).await.starts_with("console unavailable"));
    let stats = plain_relay.ctl(Request::Stats).await.unwrap();
    assert_eq!(stats["counters"]["hypervisor_failures"], 1);
}

/// Speaks VeNCrypt up to X509None and then TLS with the given (expired) certificate.
async fn expired_vencrypt_server(cert: String, key: String) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 12];
                s.write_all(b"RFB 003.008\n").await?;
                s.read_exact(&mut buf).await?;
                s.write_all(&[1, 19, 0, 2]).await?; // VeNCrypt, version 0.2
                s.read_exact(&mut buf[..3]).await?; // choice, client version
                s.write_all(&[0, 1, 0, 0, 1, 4]).await?; // version ok; X509None
                s.read_exact(&mut buf[..4]).await?;
                s.write_all(&[1]).await?;
                let _ = acceptor.accept(s).await;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    addr
}

#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn tls_on_both_legs_connect_viewer_to_x509_qemu() {
    env::qemu();
    use tokio::io::AsyncWriteExt;
    let p = pki();
    let front_ca = Ca::new("front CA");
    let front = front_ca.issue_files(&p.dir, "front", Role::Server, &["localhost"], false);
    let (ca_file, client) = (p.dir.join("ca.pem"), p.client.clone());
    let relay = TestRelay::start_with(move |c| {
        vencrypt(c, &ca_file, Some(&client));
        c.tls.cert = Some(front.cert);
        c.tls.key = Some(front.key);
        c.tls.ssl_only = true;
    })
    .await;
    let hv = qemu(&p.ca, &p.dir, &["127.0.0.1"], false, Some("hvpw")).await;
    let token = relay.token_with(with_hypervisor_password(new_token("vm-both", hv.addr()), "hvpw")).await;
    let mut tls = relay_tests::tls_client::connect(&front_ca.cert_pem(), relay.connect, "localhost").await.unwrap();
    tls.write_all(format!("CONNECT /console?token={token} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    let mut ok = [0u8; 19];
    tokio::io::AsyncReadExt::read_exact(&mut tls, &mut ok).await.unwrap();
    assert_eq!(&ok, b"HTTP/1.1 200 OK\r\n\r\n");
    let init = handshake(&mut tls, b"RFB 003.008\n", None).await.expect("RFB inside TLS on both legs");
    assert!(distinct_colours(&framebuffer(&mut tls, &init).await.unwrap()) >= 2);
}

/// QEMU ends a VeNCrypt session without TLS close_notify. A viewer that closes its
/// console is still the cause of the end: QEMU's close is the answer to relay's.
#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn a_viewer_closing_a_vencrypt_console_is_the_viewers_end() {
    env::qemu();
    let p = pki();
    let (ca_file, client) = (p.dir.join("ca.pem"), p.client.clone());
    let relay = TestRelay::start_with(move |c| vencrypt(c, &ca_file, Some(&client))).await;
    let qemu = qemu(&p.ca, &p.dir, &["127.0.0.1"], false, None).await;
    let token = relay.token("vm-x509-close", qemu.addr()).await;
    let mut viewer = relay.connect_door(&token).await.unwrap();
    let init = handshake(&mut viewer, b"RFB 003.008\n", None).await.expect("X509None through relay");
    framebuffer(&mut viewer, &init).await.unwrap();
    viewer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), viewer.read_to_end(&mut rest)).await;
    let ended = relay.ended(1).await.ended;
    assert_eq!(ended[&Cause::ViewerClosed], 1, "{ended:?}");
}

/// A TLS hypervisor that goes away gives a CONNECT viewer the same clean end (a FIN) as a
/// plain one does, not a reset.
#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn a_vanishing_tls_hypervisor_gives_the_viewer_a_clean_end() {
    env::qemu();
    let p = pki();
    let (ca_file, client) = (p.dir.join("ca.pem"), p.client.clone());
    let relay = TestRelay::start_with(move |c| vencrypt(c, &ca_file, Some(&client))).await;
    let mut qemu = qemu(&p.ca, &p.dir, &["127.0.0.1"], false, None).await;
    let token = relay.token("vm-x509-gone", qemu.addr()).await;
    let mut viewer = relay.connect_door(&token).await.unwrap();
    let init = handshake(&mut viewer, b"RFB 003.008\n", None).await.expect("X509None through relay");
    framebuffer(&mut viewer, &init).await.unwrap();
    qemu.kill();
    let mut sink = vec![0u8; 1 << 16];
    let end = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), viewer.read(&mut sink)).await.expect("the end reaches the viewer") {
            Ok(0) => break "eof".to_string(),
            Ok(_) => {}
            Err(e) => break format!("{:?}", e.kind()),
        }
    };
    assert_eq!(end, "eof", "a clean end, as from a plain hypervisor");
    drop(viewer);
    let ended = relay.ended(1).await.ended;
    assert_eq!(ended[&Cause::HypervisorClosed], 1, "{ended:?}");
}

/// nova's proxy checks a compute host's certificate chain but not its name; with
/// `verify_hostname = false` relay does the same, and still refuses a stranger's chain.
#[tokio::test]
#[cfg_attr(relay_no_qemu, ignore = "qemu-system-x86_64 is not installed: cargo xtask deps")]
async fn verify_hostname_off_accepts_a_misnamed_certificate_from_the_right_ca_only() {
    env::qemu();
    let p = pki();
    let stranger = Ca::new("some other CA");
    let (ca_file, client) = (p.dir.join("ca.pem"), p.client.clone());
    let relay = TestRelay::start_with(move |c| {
        vencrypt(c, &ca_file, Some(&client));
        c.hypervisor.verify_hostname = false;
    })
    .await;
    let misnamed = qemu(&p.ca, &p.dir, &["compute-7.internal"], false, None).await;
    let token = relay.token("vm-misnamed", misnamed.addr()).await;
    let mut viewer = relay.connect_door(&token).await.unwrap();
    handshake(&mut viewer, b"RFB 003.008\n", None).await.expect("the chain is what counts");
    let unknown = qemu(&stranger, &p.dir, &["127.0.0.1"], false, None).await;
    let token = relay.token("vm-stranger", unknown.addr()).await;
    assert!(refused(&relay, &token).await.starts_with("console unavailable"), "another CA's certificate");
}
