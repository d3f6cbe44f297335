//! TLS consoles (CONNECT over TLS) on every back-end. Where the kernel has kTLS, relay
//! moves each console's TLS into the kernel after the handshakes, and these checks are
//! what would catch wrong keys, sequence numbers or plaintext lost at the move: several
//! MiB byte-exact each way for each version and cipher, with data pipelined behind the
//! RFB handshake so that it straddles the move; close_notify both ways; a TLS 1.3
//! KeyUpdate. Where it has not (this machine), the same checks pass on rustls.
//! `cargo xtask vmtest` runs them inside Debian's kernels (`vmcheck`).

use crate::conformance::start;
use crate::conformance_order::{BLOCK, numbered_block, read_numbered_words};
use crate::fake_hypervisor::{After, FakeVnc, Script, Security, pattern, read_pattern};
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
    start_tls_with(backend, |_| {}).await
}

pub async fn start_tls_with(backend: Backend, adjust: impl FnOnce(&mut relay::config::Config) + Send + 'static) -> (TestRelay, String) {
    let ca = Ca::new("relay kTLS test CA");
    let issued = ca.issue_files(&scratch_dir("ktls"), "relay", Role::Server, &["localhost", "127.0.0.1"], false);
    let relay = start(backend, move |c| {
        c.tls.cert = Some(issued.cert);
        c.tls.key = Some(issued.key);
        adjust(c);
    })
    .await;
    (relay, ca.cert_pem())
}

/// A TLS console through the CONNECT door. The viewer sends its whole RFB handshake
/// (version, security None, ClientInit) and then `early` at once, before reading a byte,
/// in records of 1 KiB: relay's handshakes read part of it, rustls holds part, the socket
/// the rest, when the console's TLS moves.
pub async fn tls_console(relay: &TestRelay, ca: &str, suite: Suite, hv: &FakeVnc, early: &[u8]) -> TlsStream<TcpStream> {
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
        let echoed = read_numbered_words(&mut r, &Default::default()).await;
        writer.await.unwrap();
        assert_eq!(echoed, size, "{suite:?}: every byte came back, then close_notify");
        assert_eq!(hv.shared().received.load(SeqCst), size, "{suite:?}");
    }
    // Raw consoles whose TLS the kernel carries are the ring's to splice; sockmap cannot
    // take a kTLS socket, and TLS in rustls stays in userspace.
    let expected = if moves && backend == Backend::Uring { "uring" } else { "copy" };
    let ended = ended_on(&relay, Suite::ALL.len()).await;
    assert!(ended.iter().all(|relay| relay == expected), "carried by {ended:?}, expected {expected}");
}

/// The back-end of each ended console, once `n` have ended (waiting up to 10 s).
async fn ended_on(relay: &TestRelay, n: usize) -> Vec<String> {
    let mut backends = Vec::new();
    for _ in 0..100 {
        let stats = relay.ctl(Request::Stats).await.unwrap();
        backends = stats["labelled"]["ended"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| std::iter::repeat_n(e["relay"].as_str().unwrap().to_string(), e["consoles"].as_u64().unwrap() as usize))
            .collect();
        if backends.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    backends
}

/// A wss console (noVNC's way): 4 MiB each way byte-exact through an echoing hypervisor,
/// framed over the kernel's TLS where it has kTLS (by the ring on `uring`).
pub async fn tls_websocket_console_byte_exact_each_way(default: TestRelay, backend: Backend) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    drop(default);
    let (relay, ca) = start_tls(backend).await;
    let hv = FakeVnc::start(Script::echo()).await;
    let token = relay.token("vm-wss", hv.addr()).await;
    let tcp = TcpStream::connect(relay.ws).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(Suite::Tls13Aes256Gcm.config(&ca))).connect(name, tcp).await.unwrap();
    let mut req = format!("wss://localhost:{}/?token={token}", relay.ws.port()).into_client_request().unwrap();
    req.headers_mut().insert("Origin", "https://localhost".parse().unwrap());
    req.headers_mut().insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await.expect("wss upgrade");
    let mut s = crate::ws_viewer::WsByteStream::new(ws);
    crate::viewer::handshake(&mut s, b"RFB 003.008\n", None).await.unwrap();
    assert_eq!(kernel_tls_legs(&relay).await, u64::from(kernel_takes_tls()), "moved into the kernel");
    let size = 4 << 20;
    let block = numbered_block();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        for chunk in block[..size].chunks(64 << 10) {
            w.write_all(chunk).await.unwrap();
        }
        w.flush().await.unwrap();
    });
    let mut echoed = vec![0u8; size];
    r.read_exact(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert!(echoed == block[..size], "every byte came back in order");
    drop(r);
    // With its TLS in the kernel, the ring frames a wss console (`uring`).
    let expected = if kernel_takes_tls() && backend == Backend::Uring { "uring" } else { "copy" };
    assert_eq!(ended_on(&relay, 1).await, [expected], "carried by");
}

/// TLS on both sides: a viewer over TLS 1.2 and a hypervisor speaking VeNCrypt X509None
/// (TLS 1.3), 4 MiB each way byte-exact through its echo. Where the kernel has kTLS both
/// legs move (relay's client side as well as its server side), and the ring splices
/// between two kTLS sockets.
pub async fn tls_on_both_sides_byte_exact_each_way(default: TestRelay, backend: Backend) {
    drop(default);
    let ca = Ca::new("relay kTLS hypervisor CA");
    let dir = scratch_dir("ktls-vencrypt");
    let ca_file = ca.write_cert(&dir.join("ca.pem"));
    let (cert, key) = ca.issue(Role::Server, &["127.0.0.1"], false);
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let hv = FakeVnc::start(Script { security: Security::Vencrypt(Arc::new(server)), ..Script::echo() }).await;
    let (relay, viewer_ca) = start_tls_with(backend, move |c| {
        c.hypervisor.auth_schemes = vec![relay::auth::scheme::Scheme::Vencrypt];
        c.hypervisor.vencrypt_ca_certs = Some(ca_file);
    })
    .await;
    let size = 4 << 20;
    let block = numbered_block();
    let tls = tls_console(&relay, &viewer_ca, Suite::Tls12Aes128Gcm, &hv, &block[..64 << 10]).await;
    assert_eq!(kernel_tls_legs(&relay).await, if kernel_takes_tls() { 2 } else { 0 }, "both legs moved into the kernel");
    let (mut r, mut w) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        for chunk in block[64 << 10..size].chunks(64 << 10) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let echoed = read_numbered_words(&mut r, &Default::default()).await;
    writer.await.unwrap();
    assert_eq!(echoed, size, "every byte came back, then close_notify");
    assert_eq!(hv.shared().received.load(SeqCst), size);
    let expected = if kernel_takes_tls() && backend == Backend::Uring { "uring" } else { "copy" };
    assert_eq!(ended_on(&relay, 1).await, [expected], "carried by");
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
    ended_on(&relay, 1).await;
    let stats = relay.ctl(Request::Stats).await.unwrap();
    assert_eq!(stats["ended"]["hypervisor_closed"], 1, "a clean end on both sides, not an error: {stats}");
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
        // The viewer can see its end before relay has counted it (vmtest once read the
        // stats in between).
        relay.ended(1).await;
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

/// What a TLS console costs on each path here: `size` bytes from a flooding hypervisor to
/// a TLS viewer through the CONNECT door, with TLS in rustls (`kernel_tls = false`), in
/// the kernel relayed by copy, and in the kernel spliced by the ring. Returns (path, MiB/s,
/// CPU ms of this process per MiB: relay, viewer and hypervisor together, the same
/// viewer and hypervisor on every path).
pub async fn measure_paths(size: usize) -> Vec<(&'static str, f64, f64)> {
    let mut rows = Vec::new();
    for (path, backend, kernel_tls) in
        [("rustls", Backend::Copy, false), ("kTLS + copy", Backend::Copy, true), ("kTLS + uring", Backend::Uring, true)]
    {
        let (relay, ca) = start_tls_with(backend, move |c| c.relay.kernel_tls = kernel_tls).await;
        let hv = FakeVnc::start(Script::after(After::Flood(size))).await;
        let started = std::time::Instant::now();
        let cpu = cpu_time();
        let mut tls = tls_console(&relay, &ca, Suite::Tls13Aes256Gcm, &hv, &[]).await;
        let got = read_pattern(&mut tls, size).await;
        assert_eq!(got, size, "{path}");
        let mib = size as f64 / f64::from(1 << 20);
        rows.push((path, mib / started.elapsed().as_secs_f64(), (cpu_time() - cpu).as_secs_f64() * 1000.0 / mib));
    }
    rows
}

/// User and system CPU time of this process so far.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    #[allow(unsafe_code)]
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}
