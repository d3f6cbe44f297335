//! The kernel's TLS parameters (`linux/tls.h`) for one direction of a connection, built
//! from what rustls hands over after its handshake: protocol version, cipher, key, IV and
//! the sequence number of the next record.

use rustls::ConnectionTrafficSecrets;
use std::io;
use std::os::fd::AsFd;

/// The ciphers kTLS can take over from rustls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    pub const ALL: [Cipher; 3] = [Cipher::Aes128Gcm, Cipher::Aes256Gcm, Cipher::Chacha20Poly1305];

    /// The cipher of a rustls suite, by its IANA name; `None` for one kTLS cannot carry.
    pub fn of(suite: rustls::SupportedCipherSuite) -> Option<Cipher> {
        let name = format!("{:?}", suite.suite());
        if name.contains("AES_128_GCM") {
            Some(Cipher::Aes128Gcm)
        } else if name.contains("AES_256_GCM") {
            Some(Cipher::Aes256Gcm)
        } else if name.contains("CHACHA20_POLY1305") {
            Some(Cipher::Chacha20Poly1305)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }
}

/// TLS 1.2 or 1.3, as the kernel numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Tls12,
    Tls13,
}

impl Version {
    pub fn of(version: rustls::ProtocolVersion) -> Option<Version> {
        match version {
            rustls::ProtocolVersion::TLSv1_2 => Some(Version::Tls12),
            rustls::ProtocolVersion::TLSv1_3 => Some(Version::Tls13),
            _ => None,
        }
    }

    fn number(self) -> u16 {
        match self {
            Version::Tls12 => libc::TLS_1_2_VERSION,
            Version::Tls13 => libc::TLS_1_3_VERSION,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Version::Tls12 => "TLS 1.2",
            Version::Tls13 => "TLS 1.3",
        }
    }
}

/// Sending or receiving: the kernel is given each separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Tx,
    Rx,
}

/// One direction's parameters, ready for `setsockopt(SOL_TLS, TLS_TX | TLS_RX)`.
pub enum CryptoInfo {
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

impl CryptoInfo {
    /// The parameters for `dir`, whose next record has sequence number `seq`.
    pub fn new(version: Version, dir: Dir, seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<CryptoInfo> {
        let info = |cipher| libc::tls_crypto_info { version: version.number(), cipher_type: cipher };
        let rec_seq = seq.to_be_bytes();
        Ok(match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                let (salt, iv) = gcm_nonce(version, dir, seq, iv.as_ref());
                CryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                    info: info(libc::TLS_CIPHER_AES_GCM_128),
                    iv,
                    key: exact(key.as_ref())?,
                    salt,
                    rec_seq,
                })
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                let (salt, iv) = gcm_nonce(version, dir, seq, iv.as_ref());
                CryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                    info: info(libc::TLS_CIPHER_AES_GCM_256),
                    iv,
                    key: exact(key.as_ref())?,
                    salt,
                    rec_seq,
                })
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                CryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                    info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                    iv: exact(iv.as_ref())?,
                    key: exact(key.as_ref())?,
                    salt: [],
                    rec_seq,
                })
            }
            _ => return Err(io::Error::other("a cipher kTLS cannot carry")),
        })
    }

    /// Parameters with a made-up key, for probing what the kernel takes.
    pub fn dummy(version: Version, cipher: Cipher) -> CryptoInfo {
        let info = |cipher| libc::tls_crypto_info { version: version.number(), cipher_type: cipher };
        match cipher {
            Cipher::Aes128Gcm => CryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: [1; 8],
                key: [2; 16],
                salt: [3; 4],
                rec_seq: [0; 8],
            }),
            Cipher::Aes256Gcm => CryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: [1; 8],
                key: [2; 32],
                salt: [3; 4],
                rec_seq: [0; 8],
            }),
            Cipher::Chacha20Poly1305 => CryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: [1; 12],
                key: [2; 32],
                salt: [],
                rec_seq: [0; 8],
            }),
        }
    }

    /// Hands the parameters to the kernel for one direction of `socket` (the "tls"
    /// upper-layer protocol must be attached).
    pub fn install(&self, socket: &impl AsFd, dir: Dir) -> io::Result<()> {
        let name = match dir {
            Dir::Tx => libc::TLS_TX,
            Dir::Rx => libc::TLS_RX,
        };
        match self {
            CryptoInfo::Aes128Gcm(c) => crate::sockopt::set(socket, libc::SOL_TLS, name, *c),
            CryptoInfo::Aes256Gcm(c) => crate::sockopt::set(socket, libc::SOL_TLS, name, *c),
            CryptoInfo::Chacha20Poly1305(c) => crate::sockopt::set(socket, libc::SOL_TLS, name, *c),
        }
    }
}

/// An AES-GCM connection's 12-byte IV split as the kernel wants it: a 4-byte salt and the
/// 8 bytes the nonces are counted from.
///
/// TLS 1.3 makes each record's nonce `iv XOR seq` on both sides, and so does the kernel.
/// TLS 1.2 sends an explicit 8-byte nonce in each record: the receiver reads it there, but
/// the sender must never repeat one under the same key. rustls made them `iv XOR seq` for
/// the records it sent; the kernel counts upwards from the value it is given. Starting it
/// at `iv XOR seq` could meet a nonce rustls already used (`0b111 ^ 1 == 0b110 == (0b111 ^
/// 2) + 1`), so it starts past every value `iv XOR j` (j < seq) can take: those differ
/// from `iv` only in the bits below `seq`'s bit length.
fn gcm_nonce(version: Version, dir: Dir, seq: u64, iv: &[u8]) -> ([u8; 4], [u8; 8]) {
    let mut salt = [0u8; 4];
    let mut rest = [0u8; 8];
    salt.copy_from_slice(&iv[..4]);
    rest.copy_from_slice(&iv[4..12]);
    if version == Version::Tls12 && dir == Dir::Tx {
        rest = tls12_first_unused_explicit_nonce(u64::from_be_bytes(rest), seq).to_be_bytes();
    }
    (salt, rest)
}

/// The first explicit nonce from which counting up cannot meet `offset ^ j` for any
/// `j < seq` before 2^63 more records.
fn tls12_first_unused_explicit_nonce(offset: u64, seq: u64) -> u64 {
    if seq == 0 {
        return offset;
    }
    let bits = 64 - seq.leading_zeros();
    let low = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    (offset | low).wrapping_add(1)
}

fn exact<const N: usize>(bytes: &[u8]) -> io::Result<[u8; N]> {
    bytes.try_into().map_err(|_| io::Error::other(format!("a {}-byte key or IV where the kernel takes {N}", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_tls12_nonces_never_meet_the_ones_rustls_used() {
        for offset in [0u64, 7, 0x55, 0xffff_ffff_ffff_fff0, u64::MAX, 0x1234_5678_9abc_def0] {
            for seq in [0u64, 1, 2, 3, 5, 8, 100, 1000] {
                let used: std::collections::HashSet<u64> = (0..seq).map(|j| offset ^ j).collect();
                let start = tls12_first_unused_explicit_nonce(offset, seq);
                for k in 0..5000u64 {
                    assert!(!used.contains(&start.wrapping_add(k)), "offset {offset:#x} seq {seq}: kernel nonce {k} repeats one");
                }
            }
        }
        // The naive start would repeat one: rustls used 7^1 = 6; the kernel from 7^2 = 5
        // would send 5, then 6.
        assert_eq!(7u64 ^ 2, 5);
        assert!(tls12_first_unused_explicit_nonce(7, 2) > 7);
    }

    #[test]
    fn the_kernel_structures_have_linux_sizes() {
        assert_eq!(size_of::<libc::tls12_crypto_info_aes_gcm_128>(), 40);
        assert_eq!(size_of::<libc::tls12_crypto_info_aes_gcm_256>(), 56);
        assert_eq!(size_of::<libc::tls12_crypto_info_chacha20_poly1305>(), 56);
    }
}
