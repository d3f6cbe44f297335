//! Kernel TLS (kTLS): after both handshakes, a console's TLS legs hand their record layer
//! to the kernel, which then seals and opens records itself. rustls keeps the handshake;
//! the kernel gets the traffic keys and sequence numbers rustls extracted, and the
//! plaintext rustls had already decrypted is read out first ([`KernelTlsStream`]).
//!
//! What the kernel offers is probed once at start-up ([`probe`]): a kernel without
//! `CONFIG_TLS`, or without a cipher's crypto, keeps those consoles in rustls, and the log
//! says why. The move itself cannot be undone once rustls has given up its keys, so all
//! that can refuse it is checked before.

mod crypto;
pub mod records;
mod stream;

pub use crypto::{Cipher, Version};
pub use stream::{KernelTlsStream, control_record, send_close_notify};

use crate::tls::cork::Corked;
use crypto::{CryptoInfo, Dir};
use rustls::ExtractedSecrets;
use std::collections::BTreeSet;
use std::io;
use std::net::{TcpListener, TcpStream};

/// What kTLS this kernel offers, decided once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ktls {
    /// The (version, cipher) pairs the kernel accepted keys for.
    Available(Offered),
    /// Why not; TLS then stays in userspace (rustls).
    Unavailable(String),
}

/// Version and cipher pairs kTLS takes, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offered(BTreeSet<(u8, u8)>);

impl Offered {
    fn key(version: Version, cipher: Cipher) -> (u8, u8) {
        (version as u8, cipher as u8)
    }

    pub fn takes(&self, version: Version, cipher: Cipher) -> bool {
        self.0.contains(&Self::key(version, cipher))
    }

    /// How many (version, cipher) pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// "TLS 1.3 AES-128-GCM, ...", for the start-up log.
    pub fn describe(&self) -> String {
        let mut names = Vec::new();
        for version in [Version::Tls13, Version::Tls12] {
            let ciphers: Vec<&str> = Cipher::ALL.iter().filter(|c| self.takes(version, **c)).map(|c| c.name()).collect();
            if !ciphers.is_empty() {
                names.push(format!("{} {}", version.name(), ciphers.join(", ")));
            }
        }
        names.join("; ")
    }
}

/// Probes kTLS on throwaway loopback connections: attaching the "tls" upper-layer
/// protocol fails (ENOENT) on kernels built without CONFIG_TLS; then each version and
/// cipher is tried with a dummy key in both directions, as the kernel loads the crypto
/// it needs on first use and may lack some.
pub fn probe() -> Ktls {
    let attach = || -> io::Result<()> {
        let (a, _b) = loopback_pair()?;
        crate::sockopt::attach_ulp(&a, "tls")
    };
    match attach() {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Ktls::Unavailable("kernel has no TLS upper-layer protocol (CONFIG_TLS off)".into());
        }
        Err(e) => return Ktls::Unavailable(format!("probe failed: {e}")),
    }
    let mut offered = Offered::default();
    for version in [Version::Tls12, Version::Tls13] {
        for cipher in Cipher::ALL {
            if try_keys(version, cipher).is_ok() {
                offered.0.insert(Offered::key(version, cipher));
            }
        }
    }
    if offered.0.is_empty() {
        return Ktls::Unavailable("the kernel has TLS but accepted none of AES-GCM or ChaCha20-Poly1305 keys".into());
    }
    Ktls::Available(offered)
}

fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(listener.local_addr()?)?;
    let (b, _) = listener.accept()?;
    Ok((a, b))
}

fn try_keys(version: Version, cipher: Cipher) -> io::Result<()> {
    let (a, _b) = loopback_pair()?;
    crate::sockopt::attach_ulp(&a, "tls")?;
    for dir in [Dir::Tx, Dir::Rx] {
        CryptoInfo::dummy(version, cipher).install(&a, dir)?;
    }
    Ok(())
}

/// Why a leg stays in rustls (the console goes on there).
#[derive(Debug)]
pub struct Declined(pub String);

/// Everything checked that could refuse the move: the negotiated version and cipher are
/// ones the kernel takes, and the "tls" upper-layer protocol is attached to the socket.
pub fn prepare(
    ktls: &Ktls,
    version: Option<rustls::ProtocolVersion>,
    suite: Option<rustls::SupportedCipherSuite>,
    tcp: &tokio::net::TcpStream,
) -> Result<Version, Declined> {
    let Ktls::Available(offered) = ktls else { return Err(Declined("kTLS is unavailable".into())) };
    let version = version.and_then(Version::of).ok_or_else(|| Declined("a TLS version kTLS does not carry".into()))?;
    let suite = suite.ok_or_else(|| Declined("no cipher suite negotiated".into()))?;
    let cipher = Cipher::of(suite).ok_or_else(|| Declined(format!("{:?} is not a cipher kTLS carries", suite.suite())))?;
    if !offered.takes(version, cipher) {
        return Err(Declined(format!("this kernel's kTLS does not take {} {}", version.name(), cipher.name())));
    }
    crate::sockopt::attach_ulp(tcp, "tls").map_err(|e| Declined(format!("attaching the kernel's TLS layer failed: {e}")))?;
    Ok(version)
}

/// Gives the kernel both directions' keys; past this point the connection is the
/// kernel's or lost.
pub fn install(
    io: Corked,
    version: Version,
    secrets: ExtractedSecrets,
    pending: Vec<u8>,
    closed_by_peer: bool,
) -> io::Result<KernelTlsStream> {
    debug_assert!(io.at_record_boundary());
    let tcp = io.into_tcp();
    let (tx_seq, tx) = &secrets.tx;
    let (rx_seq, rx) = &secrets.rx;
    CryptoInfo::new(version, Dir::Tx, *tx_seq, tx)?.install(&tcp, Dir::Tx)?;
    CryptoInfo::new(version, Dir::Rx, *rx_seq, rx)?.install(&tcp, Dir::Rx)?;
    Ok(KernelTlsStream::new(tcp, pending, closed_by_peer))
}
