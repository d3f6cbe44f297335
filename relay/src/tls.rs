//! TLS material: the front doors' certificate (reloadable), the client identity and
//! trust roots relay uses towards hypervisors (VeNCrypt x509), and the kTLS probe.

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

fn key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("reading a private key from {}", path.display()))
}

/// The front doors' TLS identity. `reload` swaps it for new connections; live
/// sessions keep the one they started with.
pub struct FrontTls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<TlsAcceptor>,
}

impl FrontTls {
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<FrontTls> {
        let acceptor = Self::build(cert, key)?;
        Ok(FrontTls { cert: cert.into(), key: key.into(), current: RwLock::new(acceptor) })
    }

    fn build(cert: &Path, key_path: &Path) -> anyhow::Result<TlsAcceptor> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs(cert)?, key(key_path)?)
            .context("certificate and key do not match")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Re-reads the files; on any error the current identity stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let acceptor = Self::build(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// relay's TLS client towards hypervisors: trusts only the configured CA bundle and
/// presents the configured client certificate (QEMU's `verify-peer=yes` demands one).
pub fn hypervisor_connector(ca: &Path, client_cert: Option<&Path>, client_key: Option<&Path>) -> anyhow::Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).with_context(|| format!("adding a CA certificate from {}", ca.display()))?;
    }
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?.with_root_certificates(roots);
    let config = match (client_cert, client_key) {
        (Some(c), Some(k)) => builder.with_client_auth_cert(certs(c)?, key(k)?).context("client certificate and key do not match")?,
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("vencrypt_client_cert and vencrypt_client_key go together"),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Whether the kernel can carry TLS records itself (kTLS), decided once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ktls {
    Available,
    /// Why not; TLS then stays in userspace (rustls).
    Unavailable(String),
}

/// Probes kTLS on a throwaway loopback connection: attaching the "tls" upper-layer
/// protocol is what fails (ENOENT) on kernels built without CONFIG_TLS.
pub fn probe_ktls() -> Ktls {
    let attempt = || -> std::io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let _server = listener.accept()?;
        crate::sockopt::attach_ulp(&client, "tls")
    };
    match attempt() {
        Ok(()) => Ktls::Available,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            Ktls::Unavailable("kernel has no TLS upper-layer protocol (CONFIG_TLS off)".into())
        }
        Err(e) => Ktls::Unavailable(format!("probe failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ktls_probe_matches_the_kernel() {
        // Whatever the kernel, the probe answers and says why when it is unavailable;
        // /proc/net/tls_stat exists exactly when the kernel's TLS module is loaded.
        let loaded = Path::new("/proc/net/tls_stat").exists();
        match probe_ktls() {
            Ktls::Available => assert!(Path::new("/proc/net/tls_stat").exists(), "kTLS attached, so the module is loaded now"),
            Ktls::Unavailable(why) => {
                assert!(!loaded, "kTLS module loaded but the probe failed: {why}");
                eprintln!("kTLS unavailable here: {why} (TLS stays in rustls)");
            }
        }
    }
}
