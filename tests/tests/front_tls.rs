//! TLS on the front doors: CONNECT over TLS, wss for browsers, ssl_only, and a client
//! that does not trust relay's certificate.

use relay_tests::pki::{Ca, Role};
use relay_tests::relay_server::{TestRelay, scratch_dir};
use relay_tests::tls_client;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn tls_relay(ssl_only: bool) -> (TestRelay, Ca) {
    let ca = Ca::new("relay test CA");
    let dir = scratch_dir("front-tls");
    let issued = ca.issue_files(&dir, "relay", Role::Server, &["localhost", "127.0.0.1"], false);
    let relay = TestRelay::start_with(move |c| {
        c.tls.cert = Some(issued.cert);
        c.tls.key = Some(issued.key);
        c.tls.ssl_only = ssl_only;
    })
    .await;
    (relay, ca)
}

async fn read_all<S: AsyncReadExt + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn connect_door_over_tls_and_plain_on_the_same_port() {
    let (relay, ca) = tls_relay(false).await;
    let mut tls = tls_client::connect(&ca.cert_pem(), relay.connect, "localhost").await.expect("relay's certificate verifies");
    tls.write_all(b"CONNECT /console?token=nope HTTP/1.1\r\n\r\n").await.unwrap();
    let reply = read_all(&mut tls).await;
    assert!(reply.starts_with("HTTP/1.1 403 Forbidden"), "{reply}");

    let mut plain = TcpStream::connect(relay.connect).await.unwrap();
    plain.write_all(b"CONNECT /console?token=nope HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(read_all(&mut plain).await.starts_with("HTTP/1.1 403 Forbidden"));
}

#[tokio::test]
async fn wss_upgrade_checks_origin_as_https() {
    let (relay, ca) = tls_relay(true).await;
    let token = relay.token("vm", "127.0.0.1:9".parse().unwrap()).await;
    let ws_over_tls = |origin: &'static str| {
        let ca = ca.cert_pem();
        let token = token.clone();
        let addr = relay.ws;
        async move {
            let tls = tls_client::connect(&ca, addr, "localhost").await.unwrap();
            let mut req = format!("wss://localhost:{}/?token={token}", addr.port()).into_client_request().unwrap();
            req.headers_mut().insert("Origin", origin.parse().unwrap());
            req.headers_mut().insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
            tokio_tungstenite::client_async(req, tls).await
        }
    };
    let http_origin = ws_over_tls("http://localhost").await;
    match http_origin {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403, "an http page may not open a wss console"),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let (ws, resp) = ws_over_tls("https://localhost").await.expect("same-origin wss upgrade");
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "binary");
    drop(ws);
}

#[tokio::test]
async fn ssl_only_refuses_plain_connections() {
    let (relay, ca) = tls_relay(true).await;
    let mut plain = TcpStream::connect(relay.ws).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let reply = read_all(&mut plain).await;
    assert!(reply.starts_with("HTTP/1.1 400 ") && reply.contains("TLS only"), "{reply}");
    // A TLS client is still served.
    let mut tls = tls_client::connect(&ca.cert_pem(), relay.ws, "localhost").await.unwrap();
    tls.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    assert!(read_all(&mut tls).await.starts_with("HTTP/1.1 404 "));
}

#[tokio::test]
async fn a_client_that_does_not_trust_relay_fails_the_handshake() {
    let (relay, _ca) = tls_relay(false).await;
    let stranger = Ca::new("some other CA");
    let Err(err) = tls_client::connect(&stranger.cert_pem(), relay.connect, "localhost").await else { panic!("untrusted") };
    assert!(err.to_string().contains("UnknownIssuer") || err.to_string().contains("invalid peer certificate"), "{err}");
    let (relay2, ca) = tls_relay(false).await;
    let Err(err) = tls_client::connect(&ca.cert_pem(), relay2.connect, "other.example").await else { panic!("wrong name") };
    assert!(err.to_string().contains("NotValidForName") || err.to_string().contains("not valid for"), "{err}");
    // Still serving after failed handshakes.
    assert!(tls_client::connect(&ca.cert_pem(), relay2.connect, "localhost").await.is_ok());
}

/// A client limited to the given versions and suites, trusting `ca`.
async fn client_hello(
    ca: &Ca,
    addr: std::net::SocketAddr,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suite: Option<&str>,
) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites.retain(|s| format!("{:?}", s.suite()) == suite);
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.map(drop).map_err(|e| e.to_string())
}

#[tokio::test]
async fn tls_minimum_version_and_cipher_suites() {
    let ca = Ca::new("relay test CA");
    let dir = scratch_dir("front-tls-policy");
    let issued = ca.issue_files(&dir, "relay", Role::Server, &["localhost"], false);
    let files = issued.clone();
    let relay = TestRelay::start_with(move |c| {
        c.tls.cert = Some(files.cert);
        c.tls.key = Some(files.key);
        c.tls.min_version = relay::config::TlsVersion::V1_3;
        c.tls.cipher_suites = vec!["TLS13_AES_256_GCM_SHA384".into()];
    })
    .await;
    let (v12, v13) = (&rustls::version::TLS12, &rustls::version::TLS13);
    assert!(client_hello(&ca, relay.connect, &[v13], None).await.is_ok(), "TLS 1.3 with the allowed suite among those offered");
    assert!(client_hello(&ca, relay.connect, &[v12], None).await.is_err(), "TLS 1.2 is below the minimum");
    assert!(client_hello(&ca, relay.connect, &[v13], Some("TLS13_AES_128_GCM_SHA256")).await.is_err(), "a suite not allowed");
    assert!(client_hello(&ca, relay.connect, &[v13], Some("TLS13_AES_256_GCM_SHA384")).await.is_ok());

    // A suite rustls does not have, or none usable from the minimum version: refused at start.
    let mut tls = relay::config::Tls { cipher_suites: vec!["TLS_RSA_WITH_RC4_128_MD5".into()], ..Default::default() };
    let err = relay::tls::FrontTls::load(&issued.cert, &issued.key, &tls).err().expect("an unknown suite is refused");
    assert!(format!("{err:#}").contains("unknown cipher suite"), "{err:#}");
    tls.cipher_suites = vec!["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384".into()];
    tls.min_version = relay::config::TlsVersion::V1_3;
    assert!(relay::tls::FrontTls::load(&issued.cert, &issued.key, &tls).is_err(), "a TLS 1.2 suite with a 1.3 minimum");
}
