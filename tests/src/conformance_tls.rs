//! TLS consoles (CONNECT over TLS) on every back-end. Where the kernel has kTLS, relay
//! moves each console's TLS into the kernel after the handshakes, and these checks are
//! what would catch wrong keys, sequence numbers or plaintext lost at the move: several
//! MiB byte-exact each way for each version and cipher, with data pipelined behind the
//! RFB handshake so that it straddles the move; close_notify both ways; a TLS 1.3
//! KeyUpdate. Where it has not (this machine), the same checks pass on rustls.
//! `cargo xtask vmtest` runs them inside Debian's kernels (`vmcheck`).

use crate::conformance::{BLOCK, numbered_block, read_numbered_words, start};
use crate::fake_hypervisor::{After, FakeVnc, Script, pattern, read_pattern};
use crate::pki::{Ca, Role};
use crate::relay_server::{TestRelay, scratch_dir};
use relay::config::Backend;
use relay::control::proto::Request;
use relay::tls::kernel::Ktls;
use rustls::pki_types::pem::PemObject;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A viewer's TLS: the version and cipher it offers, alone.
#[derive(Debug, Clone, Copy)]
pub enum Suite {
    Tls13Aes256Gcm,
    Tls13Chacha20,
    Tls12Aes128Gcm,
    Tls12Chacha20,
}

impl Suite {
    pub const ALL: [Suite; 4] = [Suite::Tls13Aes256Gcm, Suite::Tls13Chacha20, Suite::Tls12Aes128Gcm, Suite::Tls12Chacha20];

    fn config(self, ca_pem: &str) -> rustls::ClientConfig {
        let (version, cipher) = match self {
            Suite::Tls13Aes256Gcm => (&rustls::version::TLS13, "AES_256_GCM"),
            Suite::Tls13Chacha20 => (&rustls::version::TLS13, "CHACHA20"),
            Suite::Tls12Aes128Gcm => (&rustls::version::TLS12, "AES_128_GCM"),
            Suite::Tls12Chacha20 => (&rustls::version::TLS12, "CHACHA20"),
        };
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.retain(|s| s.version() == version && format!("{:?}", s.suite()).contains(cipher));
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

/// Whether this kernel takes TLS from relay: then every console here must move.
pub fn kernel_takes_tls() -> bool {
    matches!(relay::tls::kernel::probe(), Ktls::Available(_))
}

/// A relay on `backend` whose doors take TLS, and its CA.
pub async fn start_tls(backend: Backend) -> (TestRelay, String) {
    let ca = Ca::new("relay kTLS test CA");
    let issued = ca.issue_files(&scratch_dir("ktls"), "relay", Role::Server, &["localhost", "127.0.0.1"], false);
    let relay = start(backend, move |c| {
        c.tls.cert = Some(issued.cert);
        c.tls.key = Some(issued.key);
    })
    .await;
    (relay, ca.cert_pem())
}

/// A TLS console through the CONNECT door. The viewer sends its whole RFB handshake
/// (version, security None, ClientInit) and then `early` at once, before reading a byte,
/// in records of 1 KiB: relay's handshakes read part of it, rustls holds part, the socket
/// the rest, when the console's TLS moves.
async fn tls_console(relay: &TestRelay, ca: &str, suite: Suite, hv: &FakeVnc, early: &[u8]) -> TlsStream<TcpStream> {
    let token = relay.token("vm-tls", hv.addr()).await;
    let tcp = TcpStream::connect(relay.connect).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(suite.config(ca))).connect(name, tcp).await.unwrap();
    tls.write_all(format!("CONNECT /console?token={token} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tls.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&head));
    let mut ahead = b"RFB 003.008\n".to_vec();
    ahead.extend([1u8, 1]); // security type None; ClientInit, shared
    tls.write_all(&ahead).await.unwrap();
    for record in early.chunks(1024) {
        tls.write_all(record).await.unwrap();
    }
    tls.flush().await.unwrap();
    let mut version = [0u8; 12];
    tls.read_exact(&mut version).await.unwrap();
    let types = tls.read_u8().await.unwrap();
    let mut offered = vec![0u8; types as usize];
    tls.read_exact(&mut offered).await.unwrap();
    assert_eq!(offered, [1], "relay offers None");
    assert_eq!(tls.read_u32().await.unwrap(), 0, "security result OK");
    let mut init = [0u8; 24];
    tls.read_exact(&mut init).await.unwrap();
    let mut name = vec![0u8; u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize];
    tls.read_exact(&mut name).await.unwrap();
    tls
}

async fn kernel_tls_legs(relay: &TestRelay) -> u64 {
    relay.ctl(Request::Stats).await.unwrap()["relay"]["kernel_tls_legs"].as_u64().expect("kernel_tls_legs in stats")
}

/// Every version and cipher: `size` bytes each way through an echoing hypervisor, byte
/// for byte, the first 256 KiB pipelined behind the handshake.
pub async fn tls_consoles_each_cipher_byte_exact_each_way(default: TestRelay, backend: Backend) {
    drop(default);
    let (relay, ca) = start_tls(backend).await;
    let moves = kernel_takes_tls();
    let size = 4 << 20;
    for (n, suite) in Suite::ALL.into_iter().enumerate() {
        let hv = FakeVnc::start(Script::echo()).await;
        let early = 256 << 10;
        let block = numbered_block();
        let tls = tls_console(&relay, &ca, suite, &hv, &block[..early]).await;
        assert_eq!(kernel_tls_legs(&relay).await, if moves { n as u64 + 1 } else { 0 }, "{suite:?}: moved into the kernel");
        let (mut r, mut w) = tokio::io::split(tls);
        let writer = tokio::spawn(async move {
            let mut at = early;
            while at < size {
                let end = (at + (64 << 10)).min(size);
                w.write_all(&block[at % BLOCK..(end - 1) % BLOCK + 1]).await.unwrap();
                at = end;
            }
            w.shutdown().await.unwrap();
        });
        let echoed = read_numbered_words(&mut r).await;
        writer.await.unwrap();
        assert_eq!(echoed, size, "{suite:?}: every byte came back, then close_notify");
        assert_eq!(hv.shared().received.load(SeqCst), size, "{suite:?}");
    }
}

/// close_notify both ways: the hypervisor's FIN reaches the viewer as close_notify after
/// all its data (rustls reports a clean end only then), and the viewer's close_notify
/// reaches the hypervisor as a FIN after the viewer's last bytes.
pub async fn tls_close_notify_arrives_after_the_data_both_ways(default: TestRelay, backend: Backend) {
    drop(default);
    let (relay, ca) = start_tls(backend).await;
    let hv = FakeVnc::start(Script::after(After::SendThenFin(3 << 20))).await;
    let mut tls = tls_console(&relay, &ca, Suite::Tls13Aes256Gcm, &hv, &[]).await;
    assert_eq!(read_pattern(&mut tls, usize::MAX).await, 3 << 20, "all data, then close_notify");
    tls.write_all(b"after your FIN").await.unwrap();
    tls.shutdown().await.unwrap();
    assert_eq!(hv.ends().await, vec!["eof".to_string()], "the viewer's close_notify reached it as a FIN");
    assert_eq!(hv.shared().received.load(SeqCst), 14);
}

/// A TLS 1.3 KeyUpdate from the viewer mid-stream. In rustls the console goes on. With
/// its TLS in a kernel that cannot take a new key (Debian 12's 6.1 and 6.12), the console
/// ends cleanly: every byte before the KeyUpdate arrives, nothing after it is misread as
/// data, and the end is the viewer's error.
pub async fn tls_key_update_mid_stream(default: TestRelay, backend: Backend) {
    drop(default);
    let (relay, ca) = start_tls(backend).await;
    let hv = FakeVnc::start(Script::after(After::Hold)).await;
    let mut tls = tls_console(&relay, &ca, Suite::Tls13Aes256Gcm, &hv, &[]).await;
    let moved = kernel_tls_legs(&relay).await == 1;
    assert_eq!(moved, kernel_takes_tls(), "moved into the kernel where it takes TLS");
    let half = 1 << 20;
    tls.write_all(&pattern(0, half)).await.unwrap();
    tls.flush().await.unwrap();
    arrived(&hv, half).await;
    assert_eq!(hv.shared().received.load(SeqCst), half, "the first half arrived");
    tls.get_mut().1.refresh_traffic_keys().unwrap();
    let _ = tls.write_all(&pattern(half, half)).await;
    let _ = tls.flush().await;
    if moved {
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the console ended");
        assert!(rest.is_empty(), "nothing came to the viewer");
        assert_eq!(hv.shared().received.load(SeqCst), half, "nothing after the KeyUpdate was passed on");
        let stats = relay.ctl(Request::Stats).await.unwrap();
        assert_eq!(stats["ended"]["viewer_error"], 1, "ended by the viewer's side: {stats}");
    } else {
        arrived(&hv, 2 * half).await;
        assert_eq!(hv.shared().received.load(SeqCst), 2 * half, "rustls follows the new key");
    }
}

/// Waits (up to 30 s) until the hypervisor has received `n` bytes after ServerInit.
async fn arrived(hv: &FakeVnc, n: usize) {
    for _ in 0..300 {
        if hv.shared().received.load(SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
