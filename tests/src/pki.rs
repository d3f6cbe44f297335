//! A throwaway certificate authority for TLS tests: server certificates for relay and
//! for QEMU's VNC server, client certificates for relay, and deliberately bad ones.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use std::path::{Path, PathBuf};

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `path`.
    pub fn write_cert(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert_pem()).unwrap();
        path.to_path_buf()
    }

    /// Issues a certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, role: Role, names: &[&str], expired: bool) -> (String, String) {
        let (cert, key, _) = self.issue_with_spki(role, names, expired);
        (cert, key)
    }

    /// Like `issue`, also returning the SHA-256 of the key's SubjectPublicKeyInfo in
    /// base64, as Chromium's `--ignore-certificate-errors-spki-list` takes it.
    pub fn issue_with_spki(&self, role: Role, names: &[&str], expired: bool) -> (String, String, String) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("relay-test"));
        params.extended_key_usages = vec![match role {
            Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        use base64::Engine as _;
        use sha2::Digest as _;
        let spki =
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&key)));
        (cert.pem(), key.serialize_pem(), spki)
    }

    /// Issues a certificate and writes it as `<dir>/<stem>.pem` and `<dir>/<stem>-key.pem`.
    pub fn issue_files(&self, dir: &Path, stem: &str, role: Role, names: &[&str], expired: bool) -> Issued {
        let (cert, key) = self.issue(role, names, expired);
        let issued = Issued { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}-key.pem")) };
        std::fs::write(&issued.cert, cert).unwrap();
        std::fs::write(&issued.key, key).unwrap();
        issued
    }

    /// A directory laid out as QEMU's `tls-creds-x509` wants it: `ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`, for a server known by `names`.
    pub fn qemu_creds_dir(&self, dir: &Path, names: &[&str], expired: bool) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        self.write_cert(&dir.join("ca-cert.pem"));
        let (cert, key) = self.issue(Role::Server, names, expired);
        std::fs::write(dir.join("server-cert.pem"), cert).unwrap();
        std::fs::write(dir.join("server-key.pem"), key).unwrap();
        dir.to_path_buf()
    }
}
