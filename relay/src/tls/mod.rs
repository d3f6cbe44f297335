//! TLS material: the front doors' certificate (reloadable), the client identity and
//! trust roots relay uses towards hypervisors (VeNCrypt x509); reads corked at record
//! boundaries ([`cork`]) and the move of a console's TLS into the kernel ([`kernel`]).

pub mod cork;
pub mod kernel;

use crate::config::{Hypervisor, TlsVersion};
use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::{Arc, RwLock};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What one side's TLS may use: rustls's ring provider with the configured cipher suites,
/// and the protocol versions from the configured minimum up.
struct Policy {
    provider: Arc<rustls::crypto::CryptoProvider>,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

impl Policy {
    fn new(min: TlsVersion, suites: &[String]) -> anyhow::Result<Policy> {
        let mut provider = rustls::crypto::ring::default_provider();
        if !suites.is_empty() {
            let name = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
            for wanted in suites {
                if !provider.cipher_suites.iter().any(|s| name(s) == *wanted) {
                    let known: Vec<String> = provider.cipher_suites.iter().map(name).collect();
                    bail!("unknown cipher suite {wanted:?}; known: {}", known.join(", "));
                }
            }
            provider.cipher_suites.retain(|s| suites.contains(&name(s)));
        }
        let versions: &'static [&'static rustls::SupportedProtocolVersion] = match min {
            TlsVersion::V1_2 => rustls::DEFAULT_VERSIONS,
            TlsVersion::V1_3 => TLS13_ONLY,
        };
        let usable = provider.cipher_suites.iter().any(|s| versions.iter().any(|v| s.version() == *v));
        if !usable {
            bail!("no configured cipher suite works with TLS {min:?} or later");
        }
        Ok(Policy { provider: Arc::new(provider), versions })
    }
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
    current: RwLock<TlsAcceptor>,
}

impl FrontTls {
    pub fn load(cert: &Path, key: &Path, tls: &crate::config::Tls) -> anyhow::Result<FrontTls> {
        Ok(FrontTls { current: RwLock::new(Self::acceptor_for(cert, key, tls)?) })
    }

    fn acceptor_for(cert: &Path, key: &Path, tls: &crate::config::Tls) -> anyhow::Result<TlsAcceptor> {
        let policy = Policy::new(tls.min_version, &tls.cipher_suites).context("tls")?;
        Self::build(cert, key, &policy)
    }

    fn build(cert: &Path, key_path: &Path, policy: &Policy) -> anyhow::Result<TlsAcceptor> {
        let mut config = ServerConfig::builder_with_provider(policy.provider.clone())
            .with_protocol_versions(policy.versions)?
            .with_no_client_auth()
            .with_single_cert(certs(cert)?, key(key_path)?)
            .context("certificate and key do not match")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // So that a console's TLS can move into the kernel (kTLS) after the handshakes.
        config.enable_secret_extraction = true;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Re-reads the files `tls` names, under its version and cipher settings; on any
    /// error the current identity stays.
    pub fn reload(&self, tls: &crate::config::Tls) -> anyhow::Result<()> {
        let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
            bail!("tls.cert and tls.key are gone: turning TLS off needs a restart")
        };
        let acceptor = Self::acceptor_for(cert, key, tls)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// relay's TLS client towards hypervisors: trusts only the configured CA bundle and
/// presents the configured client certificate (QEMU's `verify-peer=yes` demands one).
pub fn hypervisor_connector(ca: &Path, h: &Hypervisor) -> anyhow::Result<TlsConnector> {
    let (client_cert, client_key) = (h.vencrypt_client_cert.as_deref(), h.vencrypt_client_key.as_deref());
    let policy = Policy::new(h.tls_min_version, &h.tls_cipher_suites).context("hypervisor.tls_cipher_suites")?;
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).with_context(|| format!("adding a CA certificate from {}", ca.display()))?;
    }
    let builder = ClientConfig::builder_with_provider(policy.provider.clone()).with_protocol_versions(policy.versions)?;
    let builder = match h.verify_hostname {
        true => builder.with_root_certificates(roots),
        false => {
            let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), policy.provider.clone()).build()?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(chain)))
        }
    };
    let mut config = match (client_cert, client_key) {
        (Some(c), Some(k)) => builder.with_client_auth_cert(certs(c)?, key(k)?).context("client certificate and key do not match")?,
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("vencrypt_client_cert and vencrypt_client_key go together"),
    };
    config.enable_secret_extraction = true;
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Verifies a hypervisor's certificate chain, expiry and signatures, but not the name in
/// it (`verify_hostname = false`): nova's proxy checks no more than that.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::kernel::{Ktls, probe};
    use std::path::Path;

    #[test]
    fn ktls_probe_matches_the_kernel() {
        // Whatever the kernel, the probe answers and says why when it is unavailable;
        // /proc/net/tls_stat exists exactly when the kernel's TLS module is loaded.
        let loaded = Path::new("/proc/net/tls_stat").exists();
        match probe() {
            Ktls::Available(offered) => {
                assert!(Path::new("/proc/net/tls_stat").exists(), "kTLS attached, so the module is loaded now");
                assert!(!offered.describe().is_empty());
            }
            Ktls::Unavailable(why) => {
                assert!(!loaded, "kTLS module loaded but the probe failed: {why}");
                eprintln!("kTLS unavailable here: {why} (TLS stays in rustls)");
            }
        }
    }
}
