//! Passwords at rest. VNC authentication needs the clear password (it is the DES key),
//! so stores cannot keep a hash: they keep it sealed with ChaCha20-Poly1305 under a key
//! that lives in a file of its own, never beside the data in Redis.
//!
//! A sealed value is bound to what it belongs to (`context`: the instance, or the
//! token): copying one instance's sealed password onto another fails to open.

use super::token::Secret;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use std::path::Path;

/// What a sealed console password is bound to: its instance.
pub fn password_context(instance: &str) -> String {
    format!("password:{instance}")
}

/// Fewest bytes of key material a key file must hold.
pub const MIN_KEY_BYTES: usize = 32;

pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("secret key file {0}: {1}")]
    KeyFile(String, String),
    #[error("a sealed password does not open with this key (another key file, or damaged data)")]
    Open,
}

impl Sealer {
    /// From key material (any bytes, at least [`MIN_KEY_BYTES`]); the key is its SHA-256,
    /// so a file of hex, base64 or raw bytes all serve.
    pub fn from_material(material: &[u8]) -> Result<Sealer, String> {
        let material = material.trim_ascii();
        if material.len() < MIN_KEY_BYTES {
            return Err(format!("holds {} bytes; at least {MIN_KEY_BYTES} random bytes are needed", material.len()));
        }
        let digest: [u8; 32] = Sha256::digest(material).into();
        let key = UnboundKey::new(&CHACHA20_POLY1305, &digest).map_err(|_| "key setup failed".to_string())?;
        Ok(Sealer { key: LessSafeKey::new(key), rng: SystemRandom::new() })
    }

    /// Reads a key file, refusing one that others may read.
    pub fn load(path: &Path) -> Result<Sealer, SealError> {
        use std::os::unix::fs::MetadataExt;
        let err = |m: String| SealError::KeyFile(path.display().to_string(), m);
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(err(format!("mode {:o} lets others read it; chmod 600", meta.mode() & 0o777)));
        }
        let material = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Sealer::from_material(&material).map_err(err)
    }

    /// Reads the key file, first writing a fresh random one (mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<Sealer, SealError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        if !path.exists() {
            let err = |e: std::io::Error| SealError::KeyFile(path.display().to_string(), e.to_string());
            let mut bytes = [0u8; 32];
            SystemRandom::new().fill(&mut bytes).map_err(|_| SealError::KeyFile(path.display().to_string(), "no randomness".into()))?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            // create_new: two processes starting at once cannot both write a key.
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(mut f) => f.write_all(format!("{hex}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(err)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(e)),
            }
        }
        Sealer::load(path)
    }

    /// Seals `secret` for `context`: base64 of nonce, ciphertext and tag.
    pub fn seal(&self, context: &str, secret: &Secret) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        // SystemRandom reads getrandom(2); it fails only on a kernel without it.
        self.rng.fill(&mut nonce).expect("the kernel's random source");
        let mut data = secret.0.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context.as_bytes()), &mut data)
            .expect("a password is far below the AEAD's length limit");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        STANDARD_NO_PAD.encode(out)
    }

    pub fn open(&self, context: &str, sealed: &str) -> Result<Secret, SealError> {
        let bytes = STANDARD_NO_PAD.decode(sealed).map_err(|_| SealError::Open)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, data) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut data = data.to_vec();
        let clear = self.key.open_in_place(nonce, Aad::from(context.as_bytes()), &mut data).map_err(|_| SealError::Open)?;
        String::from_utf8(clear.to_vec()).map(Secret).map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_passwords_open_only_with_their_key_and_context() {
        let s = Sealer::from_material(&[7u8; 32]).unwrap();
        let sealed = s.seal("vm1", &Secret("s3cret".into()));
        assert!(!sealed.contains("s3cret"));
        assert_ne!(sealed, s.seal("vm1", &Secret("s3cret".into())), "a fresh nonce each time");
        assert_eq!(s.open("vm1", &sealed).unwrap().0, "s3cret");
        assert!(s.open("vm2", &sealed).is_err(), "bound to its instance");
        assert!(Sealer::from_material(&[8u8; 32]).unwrap().open("vm1", &sealed).is_err(), "and to its key");
        assert!(s.open("vm1", "!!").is_err());
        assert!(Sealer::from_material(b"short").is_err());
    }

    #[test]
    fn key_files_are_created_private_and_refused_when_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("relay-seal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let _ = std::fs::remove_file(&path);
        let a = Sealer::load_or_create(&path).unwrap();
        let b = Sealer::load_or_create(&path).unwrap();
        assert_eq!(b.open("x", &a.seal("x", &Secret("pw".into()))).unwrap().0, "pw", "the same key on reload");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Sealer::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
